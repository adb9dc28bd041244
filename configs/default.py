"""The embedded default: a tiny Mixer on the digits that scikit-learn ships (offline, ~1 min on 2 cores).

  python train.py --workdir /tmp/w                     # this config
  python train.py --config configs/default.py --config.lr=3e-3
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: any tfds dataset with "image" and "label" features.
  config.dataset = "digits"
  config.data_dir = config_dict.placeholder(str)  # None: tfds's default (~/tensorflow_datasets).
  config.train_split = "train"
  config.train_percent = 100  # train on the first N% of train_split (the paper's 3/10/30/100% study).
  config.label_subset = ""  # keep only these classes, relabelled from 0: "5-9" or "0,2,4"; "" keeps all.
  config.label_key = "label"  # a ClassLabel, or a Sequence of them (multi-label, JFT-style).
  config.max_labels = 16  # multi-label only: labels kept per image.
  config.num_classes = config_dict.placeholder(int)  # None: read from the dataset's info.
  # The 8x8 digits are upsampled so that 4x4 patches give a 4x4 token grid.
  config.pp_train = "decode(channels=1)|resize(16)|value_range(-1, 1)"
  config.pp_eval = "decode(channels=1)|resize(16)|value_range(-1, 1)"
  config.shuffle_buffer = 2_000
  # The train split is read in this many shards, each filling its block of every batch: 0 is one per process
  # at the run's start (recorded in config.json). A resume on another number of processes keeps the order of
  # examples when that number divides it: e.g. 8 lets a run move between 1, 2, 4 and 8 hosts.
  config.input_shards = 0
  config.prefetch_to_device = 2
  config.batch_size = 128  # global, over all devices and processes.
  config.eval_batch_size = 256

  config.model = ml_collections.ConfigDict()
  config.model.variant = "Ti/4"  # SIZE/PATCH: Ti (tiny, not in the paper), S, B, L, H.
  config.model.dropout_rate = 0.0
  config.model.stoch_depth = 0.0
  config.model.gelu_approximate = True  # tanh gelu, as the released checkpoints.
  config.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators. Params stay float32.
  config.model.tokens_mlp_dim = config_dict.placeholder(int)  # None: the variant's D_S (Table 1).
  config.model.remat = False  # recompute block activations in the backward pass: less memory.
  config.model.scan_blocks = False  # nn.scan over blocks: faster compiles, slower steps (README, Performance).

  # Initialisation from pre-trained parameters (fine-tuning); used when the workdir has no checkpoint.
  config.init = ml_collections.ConfigDict()
  config.init.checkpoint = config_dict.placeholder(str)  # a released .npz, or a workdir of ours.
  config.init.new_head = True  # a zero-initialised head for this dataset's classes.
  # A different token grid (resolution): "block_diagonal" (an integer ratio K, paper App. C: exact), or
  # "resample" (any grid, e.g. 128px from 224px: token-mixing weights interpolated as 2-D grids).
  config.init.token_mixing = "block_diagonal"

  config.loss = "softmax_xent"  # or "sigmoid_xent" (the paper's choice for large label spaces).
  config.mixup = 0.0  # mixup's Beta(p, p) parameter; 0 turns it off (paper: 0.2-0.5 on ImageNet).
  config.grad_accum_steps = 1  # split each batch into this many sequential micro-batches.

  # Optimizer: Adam with decoupled weight decay, warm-up, decay, clipping (paper Sec. 3).
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"  # or "sgd" (momentum), the paper's fine-tuning optimizer.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.momentum = 0.9  # sgd only.
  config.lr = 3e-3
  config.weight_decay = 1e-4  # multiplied by the scheduled lr, as in optax.adamw.
  config.schedule = "cosine"  # decay after warm-up: "linear" or "cosine", to 0.
  config.warmup_steps = 50
  config.grad_clip_norm = 1.0
  # Length: total_steps if positive, else total_epochs of the train split.
  config.total_epochs = 40.0
  config.total_steps = -1

  # Device mesh: "data" splits the batch, "model" the parameters; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
  # Parameter layout: replicated (data parallel), fsdp, tensor, fsdp_tensor, or "embed=data,mlp=model".
  config.param_sharding = "replicated"

  # Evaluators (mixer/evaluators/), each named by its TensorBoard prefix: its type, every_steps (N: every N
  # training steps and at the last; 0: only from evaluate.py) and the type's own keys.
  config.evals = ml_collections.ConfigDict()
  config.evals.eval = ml_collections.ConfigDict(dict(  # top-1 and loss on a whole split (eval/top1)
      type="classification", split="test", every_steps=100))
  # Few-shot linear regression on frozen features (paper Sec. 3; ViT paper Sec. 4.1), fewshot/digits_5shot.
  config.evals.fewshot = ml_collections.ConfigDict(dict(
      type="fewshot",
      datasets={"digits": ("digits", "train", "test")},  # name: (tfds name, train split, test split)
      shots=(1, 5, 10, 25),
      seeds=3,  # support sets drawn per dataset; results are their mean.
      l2_reg=2.0**10,  # as big_vision's few-shot evaluator.
      pp="decode(channels=1)|resize(16)|value_range(-1, 1)",
      batch_size=256,
      every_steps=0))  # 0: only with evaluate.py --fewshot.

  # A non-finite loss or gradient: "stop" (raise, keeping the checkpoints from before it) or "skip" the update.
  config.nan_policy = "stop"
  # "skip" gives up (raises as "stop" does) past this many skipped steps in a row, or in all of a run: a run
  # whose loss stays non-finite learns nothing, so it should end, not report the accuracy of a stalled model.
  config.max_nonfinite_steps = 10
  config.max_nonfinite_total = 100
  # An image that does not decode: "fail" (with the dataset and split named) or "skip" (counted in the log).
  config.bad_images = "fail"

  # Keys a resume may change (comma-separated; "optim" allows optim.*, "dataset" a changed dataset). Any other
  # change that can alter the result is refused; allowed ones are appended to the workdir's config_changes.json.
  config.allow_changes = ""

  config.log_every_steps = 10
  # JAX's persistent compilation cache, so that a restart or a resumed run loads its compiled steps instead of
  # compiling them again: "auto" (beside a gs:// workdir, else ~/.cache/mixer/; mixer/compilation.py says why),
  # "none" (off), or a directory (local or gs://).
  config.compile_cache_dir = "auto"
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3
  # A jax.profiler trace of steps profile_start_step..+profile_num_steps-1 (steps count from 1; 0: no trace) into
  # WORKDIR/plugins/profile, for TensorBoard's profile tab (docs/launching.md, "Profiling a run").
  config.profile_start_step = 0
  config.profile_num_steps = 5
  return config

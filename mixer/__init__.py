"""mixer: MLP-Mixer (Tolstikhin et al. 2021) pre-training, fine-tuning and evaluation in JAX/Flax."""

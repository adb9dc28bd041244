"""tfds builders that ship with mixer; importing this package registers them with tfds."""

from mixer.datasets.digits import Digits
from mixer.datasets.imagenet21k import Imagenet21k  # noqa: F401 (registers the builder)

# Datasets whose data installs with a package: the input pipeline prepares them on first use.
EMBEDDED = {"digits": Digits}

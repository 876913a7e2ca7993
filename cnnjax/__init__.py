"""cnnjax: classic convolutional networks in JAX/Flax."""

"""Training: state, compiled steps, optimizers, the loop."""

"""The tiny setting every smoke variant shares: the embedded digits, a few steps, quiet."""


def on_digits(train_config, image_size: int, batch_size: int, num_steps: int) -> None:
  t = train_config
  t.data.dataset = "digits"
  t.data.image_size = image_size
  t.data.mean, t.data.std = (0.5,), (0.5,)
  t.data.flip = False
  t.batch_size = batch_size
  t.num_steps = num_steps
  t.optimizer.warmup_epochs = 0.0
  t.progress_bar = False
  t.fast_compile = True

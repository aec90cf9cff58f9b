"""GPU worker: loads one diffusion model per GPU and generates batches of images."""

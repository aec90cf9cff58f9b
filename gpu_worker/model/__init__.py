"""The model: diffusers pipelines, their acceleration, VAE decoding, PNG encoding."""

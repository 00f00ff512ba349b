"""Admin commands: install, check, demo."""

"""DFlash drafter training: target-generated data, cached target features, the block-diffusion objective."""

"""The torch runtime: real Hugging Face modules, preprocessing, point-to-point transfer and
the distributed training loop. Everything torch lives here (and in data/)."""

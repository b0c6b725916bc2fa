"""Training and evaluation of CvT: the pieces behind `python -m cvt_fast.train` / `cvt_fast.test`.

data.py      ImageFolder datasets, official/timm transforms (training: up to uint8 CHW), the resumable epoch sampler
device_input.py  the training batch's float conversion, normalisation and random erasing, on the device
dali_loader.py   DATA.LOADER dali: decoding and augmentation on NVIDIA DALI (GPU, or its CPU mode)
digits.py    scikit-learn's digits exported once as an ImageFolder (the built-in experiment)
optim.py     AdamW parameter groups, per-iteration cosine schedule, losses, mixup
ema.py       exponential moving average of the weights
resume.py    atomic, verified, resumable checkpoints (model, optimizer, RNG, data position), pruning
stop.py      SIGTERM / SIGINT: stop at the next step boundary with a checkpoint
outputs.py   errors writing the run folder as one line naming the path
distributed.py  torchrun / DDP set-up, per-rank seeds, all-reduce helpers, BatchNorm averaging
logs.py      text log, metrics.jsonl, TensorBoard
plots.py     the end-of-run PNG of loss, accuracy and learning rate
loop.py      the Trainer: steps, evaluation, checkpoints, resume
cli.py       shared command-line plumbing (config loading, one-line errors)
"""

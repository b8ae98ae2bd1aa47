"""EmoLoRA trainer core: SDXL model loading, LoRA injection/export, data pipeline and training loop.

Module map (what each module owns):
- config.py: TrainConfig, presets and the merge of presets, config files and flags; cli.py: the commands.
- parts.py: the run's explicit parts (Runtime, LoadedModel, RunSetup, LoopState, Hooks).
- build.py: making the parts (scan, device/precision, model, run folder, network, data and caches, optimizer).
- train.py: Trainer, the loop: micro-batches, the optimizer step, saves; step_read.py: the step's one host read;
  stop_rules.py: what may end a run or warn after a step; schedule.py: the LR schedule.
- losses.py: the training loss of a batch, the fixed-noise evaluation and validation losses.
- rollback.py: the finiteness probe of the LoRA (and the size of its last update) and the rollback of a
  non-finite update.
- offload.py: UNet block offloading (blocks streamed from pinned host memory by hooks); vram.py: the VRAM
  estimate made before the first step.
- optimizer_loss.py: the loss handed to the optimizer when normalized (per-timestep-bucket EMAs); zones.py: which
  zone of its optimizer a step was in (accelerate, brake, ...).
- state.py: the resumable state file (state.pt); checkpoint.py: LoRA files and their kohya metadata.
- telemetry.py: step records, memory, progress bar, TensorBoard, the run summary; samples.py: preview images.
- devices.py: the run's device and precision; placement.py: which device and mode the model's modules are in;
  diffusion.py: noise schedule and losses.
- runstore.py: the run folder's telemetry store (sqlite) and control file, shared with the panel and ComfyUI;
  whether a run's process is alive (pid and start time) and which runs can resume.
- atomic.py: the one atomic file writer.
- distributed.py: several processes in lockstep (torchrun/accelerate): process group, batch shards, the step's
  gradient+loss all-reduce, rank-0-only writes, shared control, lockstep checksum; launch.py: the torchrun command.
- oft_rules.py: OFT/BOFT block layouts and the settings ComfyUI applies as LyCORIS does (torch-free, for the config);
  divisors.py: the divisor pair LyCORIS factors a dimension by (LoKr, Diag-OFT).
- model/: loading SDXL checkpoints, the adapters (LoRA/LoHa/LoKr, DoRA, OFT/BOFT), kohya export, the tiny test
  models (random: tiny.py; UNet fine-tuned on the demo photos: pretrained.py); data/: dataset scan, validation
  split, masks, buckets, caches, the demo photos (demo.py).
- optim/: the optimizers (one module each over shared mechanics).
- sweep/: the optimizer sweep (plan, the shared model and caches, report, chart, the loop with resume).

Kept import-light on purpose: ComfyUI imports this package at start-up, so heavy libraries
(diffusers, transformers) are only imported inside the functions that need them.
"""

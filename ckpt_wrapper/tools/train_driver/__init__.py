"""The training driver: every mode of training with checkpointing, for tests and for trying combinations.

``scripts/launch/train.py`` is the short example to copy; this driver runs the full matrix with the same
flags where they overlap (``ckpt_wrapper.tools.flags``):

    python scripts/launch/train_driver.py --parallel none --steps 20                   # one process
    torchrun --nproc_per_node 2 scripts/launch/train_driver.py --parallel fsdp1 --ac-order after
    scripts/launch/run.sh driver --model llama --ac selective --param-dtype bf16        # torchrun, 2 ranks
    accelerate launch --config_file scripts/launch/accelerate_fsdp2.yaml scripts/launch/train_driver.py \\
        --parallel accelerate

(``python -m ckpt_wrapper.tools.train_driver`` is the same program.) Stop and resume, bitwise on CPU
whatever the blocks wrapped:

    scripts/launch/run.sh driver --steps 100 --checkpoint-dir ckpt --stop-after 40
    scripts/launch/run.sh driver --steps 100 --checkpoint-dir ckpt --ac none      # resumes at step 41

Every rank builds the same seeded model, checkpoints the chosen blocks (``--ac``), shards it
(``--parallel``; gloo on CPU, NCCL on GPUs) and trains on its slice of a global batch that depends only
on the seed and the step. ``--checkpoint-dir`` saves model and optimizer with
``torch.distributed.checkpoint`` plus, per rank, the RNG state and the data position, and ``run.json``
(the model and run configuration: a folder of another run is refused). Each step is written aside and
renamed into place; a damaged newest step is named and the previous one resumed; ``--keep-last`` steps
are kept (3). SIGINT and SIGTERM finish the step, save it and exit with 130 / 143. Rank 0 shows a
progress line (loss, tokens/s, memory) and ends with a summary table (activation memory of a forward;
on CUDA also the allocator's peak). A mistake in the flags is one line on rank 0, exit status 2.

Modules: ``args`` (the command line and its checks), ``modes`` (models, data, checkpointing modes),
``checkpoints`` (DCP save and resume), ``progress`` (display and summary), ``loop`` (the run).
"""

from ckpt_wrapper.tools.train_driver.loop import main, run

__all__ = ["main", "run"]

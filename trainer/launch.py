"""The command line of a training run as N local processes (torch-free: the panel imports it).

Hosts that start a run as a child process and follow it through its run store (the panel's start form; a
ComfyUI node) use it, so `gpus=2` means `torchrun --standalone --nproc_per_node=2 -m trainer train ...`
(trainer/distributed.py does the rest inside the processes).
"""

import sys


def launch_command(cli_args: list, processes: int = 1) -> list:
    """The command that runs `python -m trainer <cli_args>` as `processes` local ranks: torchrun with its
    single-machine rendezvous (--standalone: it picks a free port) for more than one, the plain CLI for one."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes == 1:
        return [sys.executable, "-m", "trainer", *cli_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "trainer", *cli_args]

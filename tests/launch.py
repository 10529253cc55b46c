"""Launching test scripts under torchrun on CPU: one node of several processes, or two "nodes" on one host; a
process of a torch.multiprocessing test joining its gloo group."""
import datetime
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, *args, nproc=2, launcher=(), check=True, timeout=600):
    """Run `script` under torchrun on CPU (`launcher`: extra torchrun options). --standalone picks a free
    rendezvous port, so two test sessions at once never collide."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *launcher, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(script, *args, timeout=600):
    """Two torchrun launches of one gloo process each, as on two nodes: --nnodes=2, node ranks 0 and 1, a c10d
    rendezvous on 127.0.0.1 at a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            "--rdzv_id=fashionlens-test"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, f"--node_rank={n}", str(script),
                               *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=REPO) for n in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=timeout)
        assert node.returncode == 0, err[-3000:]


def join_gloo(rank, world, init_file):
    """Rank `rank` of a gloo group of `world` processes on one thread, for a worker started by mp.spawn. A collective
    one rank never joins fails after a minute instead of hanging the suite (mp.spawn itself waits forever)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

"""Past one machine, on this one: two torchrun launchers on localhost act as two nodes (`--nnodes 2
--nproc_per_node 1`, c10d rendezvous at 127.0.0.1), and train.strategy "fsdp" shards the model with
FSDP2; both with gloo on the CPU, each process on one thread (torchrun sets OMP_NUM_THREADS=1 only when
a node runs several processes, and the thread count changes the numerics).

- two nodes train, evaluate, save once and resume, and end where one node with two processes ends;
- a node killed mid-epoch: the survivor exits with one sentence within seconds, and --resume on both
  nodes ends where the run that was never interrupted ends;
- FSDP (with gradient checkpointing) against DDP: the same losses and weights within float tolerance;
  killed and resumed, bit for bit; its best_hf/ and best.pt load in one plain process.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import faults_util as fu
from helpers import ROOT, make_folder, tiny_params
from vit import ViTForImageClassification

EPOCHS = 2  # 27 train images over 2 ranks at batch 4: 3 steps per epoch
KILL_AT = 5  # the optimizer step (of the victim's process) at which its node dies: in epoch 2, after epoch 1's save
SURVIVOR_S = 60  # the bound on how long a survivor may take to stop once its peer is gone


def env(**more):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **more}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, *nodes_args, script="main.py"):
    return [sys.executable, "-m", "torch.distributed.run", *nodes_args, script, *args]


def one_node(args, **kw):
    """torchrun --standalone --nproc_per_node 2: the run the two nodes must equal."""
    return subprocess.run(torchrun(args, "--standalone", "--nproc_per_node=2", **kw), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=240)


def start_nodes(args, log_dir, tag, script="main.py", victim_env=None):
    """Two launchers, one process each, rendezvous at 127.0.0.1 on a free port; node 0 starts first so it
    hosts the c10d store. `victim_env` goes to node 1 only. Returns the Popen of each, output to files."""
    port, nodes = free_port(), []
    for n in (0, 1):
        rdzv = ["--nnodes=2", f"--node_rank={n}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={tag}"]
        out, err = open(log_dir / f"{tag}{n}.out", "w"), open(log_dir / f"{tag}{n}.err", "w")
        nodes.append(subprocess.Popen(torchrun(args, *rdzv, script=script), cwd=ROOT, stdout=out, stderr=err,
                                      env=env(**(victim_env if n == 1 and victim_env else {}))))
        out.close()
        err.close()
        if n == 0:
            time.sleep(1.0)
    return nodes


def finish(nodes, log_dir, tag, timeout=240):
    """Wait for both launchers; (exit codes, [stdout, stderr] per node)."""
    codes = [p.wait(timeout=timeout) for p in nodes]
    return codes, [((log_dir / f"{tag}{n}.out").read_text(), (log_dir / f"{tag}{n}.err").read_text()) for n in (0, 1)]


def descendants(pid):
    """Every process below `pid` (a launcher's workers), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # a process that ended while we looked
                continue
            if ppid == pid:
                kids += [int(entry), *descendants(int(entry))]
    return kids


def processes(args, log_dir, world_size=2, **faults):
    """`world_size` processes of one run forked from the suite's preloaded server (faults_util.Child), with
    the variables torchrun would set: the FSDP tests' gloo ranks without torchrun's start-up cost."""
    port = free_port()
    return [fu.Child(args, log_dir, env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size),
                                         "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": str(port)}, **faults) for r in range(world_size)]


def weights(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)


def assert_close_weights(a, b, tol, what):
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff <= tol, f"{what}: weights differ by {diff:.2e}"
    return diff


def layout(run_dir):
    """The run folder's file names, a TensorBoard event file's (time and process in its name) as "events"."""
    return sorted("events" if name.startswith("events.out.tfevents.") else name for name in os.listdir(run_dir))


def losses(run_dir):
    return [h[k] for h in fu.read_metrics(run_dir) for k in ("loss", "val_loss")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    make_folder(root / "images", classes=3, per_class=12)
    params = tiny_params(root, root / "images", epochs=EPOCHS, batch_size=4)
    return root, params


@pytest.fixture(scope="module")
def one_node_run(setup):
    """The one-node two-process DDP run: what two nodes and FSDP must equal."""
    root, params = setup
    r = one_node(["--params", params, "--set", f"output.dir={root / 'one_node'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return str(root / "one_node")


@pytest.fixture(scope="module")
def two_nodes_run(setup):
    """The same params on two launchers: (the run folder, its last.pt as it was at the end, both nodes' logs)."""
    root, params = setup
    run = root / "two_nodes"
    codes, logs = finish(start_nodes(["--params", params, "--set", f"output.dir={run}"], root, "a"), root, "a")
    assert codes == [0, 0], [log[1][-2000:] for log in logs]
    return run, weights(run), logs


def test_two_nodes_equal_one_node_and_save_once(setup, one_node_run, two_nodes_run, tmp_path):
    root, params = setup
    run, ckpt, logs = two_nodes_run
    outs = [out for out, _ in logs]
    # one node holds global rank 0: it alone prints and writes; the other prints nothing
    printing = [o for o in outs if "Epoch : " in o]
    assert len(printing) == 1 and all(not o.strip() for o in outs if o not in printing), outs
    assert printing[0].count("Epoch : 2 ") == 1 and "DDP over 2 processes on 2 nodes" in printing[0], printing[0]
    assert layout(run) == layout(one_node_run), "the run folder's files, each once"
    assert [h["epoch"] for h in fu.read_metrics(run)] == [1, 2]
    assert (ckpt["world_size"], ckpt["nodes"]) == (2, 2)
    diff = assert_close_weights(ckpt, weights(one_node_run), 1e-6, "two nodes against one")
    print(f"\ntwo nodes against one: weights differ by at most {diff:.1e}")
    assert losses(run) == pytest.approx(losses(one_node_run), rel=1e-6)
    # resumed on two nodes: the next test, after a node dies


def test_a_killed_node_stops_the_other_with_one_sentence_and_the_run_resumes(setup, two_nodes_run, tmp_path):
    root, params = setup
    run, marker = tmp_path / "run", tmp_path / "marker"
    args = ["--params", params, "--set", f"output.dir={run}"]
    # node 1's process waits at its KILL_AT-th optimizer step (epoch 2), and there the node dies whole
    nodes = start_nodes(args, tmp_path, "k", script="tests/faults_util.py",
                        victim_env={"FAULTS_AT": f"step:{KILL_AT}", "FAULTS_ACTION": "WAIT", "FAULTS_MARKER": str(marker)})
    deadline = time.time() + 180
    while not marker.exists():
        assert time.time() < deadline and nodes[0].poll() is None, "node 1 never reached its kill point"
        time.sleep(0.05)
    for pid in [*descendants(nodes[1].pid), nodes[1].pid]:
        os.kill(pid, signal.SIGKILL)
    killed = time.time()
    code = nodes[0].wait(timeout=SURVIVOR_S)
    took = time.time() - killed
    nodes[1].wait()
    err = (tmp_path / "k0.err").read_text()
    assert code != 0, err[-2000:]
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "another process of this distributed run is gone" in ours[0] and "--resume" in ours[0], err[-3000:]
    assert weights(run)["epoch"] == 1  # epoch 1's last.pt, whole

    codes, logs = finish(start_nodes([*args, "--resume"], tmp_path, "r"), tmp_path, "r")
    assert codes == [0, 0], [log[1][-2000:] for log in logs]
    assert_close_weights(weights(run), two_nodes_run[1], 1e-6, "killed and resumed against uninterrupted")
    print(f"\nsurvivor stopped {took:.1f} s after its peer's node was killed")


def test_fsdp_equals_ddp_resumes_exactly_and_writes_plain_checkpoints(setup, one_node_run, tmp_path):
    root, params = setup
    fsdp = ["--params", params, "--set", "train.strategy=fsdp", "train.grad_checkpointing=true"]
    rank0, rank1 = [p.wait(180) for p in processes([*fsdp, f"output.dir={tmp_path / 'fsdp'}"], tmp_path)]
    assert rank0.returncode == rank1.returncode == 0, rank0.stderr[-3000:] + rank1.stderr[-3000:]
    assert "FSDP over 2 processes" in rank0.stdout and not rank1.stdout.strip()
    ours, ddp = weights(tmp_path / "fsdp"), weights(one_node_run)
    diff = assert_close_weights(ours, ddp, 1e-5, "FSDP against DDP")
    print(f"\nFSDP against DDP: weights differ by at most {diff:.1e}")
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(one_node_run), rel=1e-5, abs=1e-6)
    assert ours["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()
    for i, state in ddp["optimizer"]["state"].items():  # AdamW's moments, gathered whole and numbered as DDP's
        for key, value in state.items():
            assert torch.allclose(ours["optimizer"]["state"][i][key].float(), value.float(), atol=1e-6), (i, key)
    # written under FSDP, read in one plain process: the HF folder (ours and transformers') and best.pt
    import transformers
    for path in (tmp_path / "fsdp" / "best_hf", tmp_path / "fsdp" / "best.pt"):
        model = ViTForImageClassification.from_pretrained(str(path))
        assert model.config.num_labels == 3
    transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "fsdp" / "best_hf"))

    # killed at a step of epoch 2 (one rank dies; the other says so), then resumed: bit for bit
    killed = [p.wait(180) for p in processes([*fsdp, f"output.dir={tmp_path / 'killed'}"], tmp_path, at=f"step:{KILL_AT}")]
    assert all(k.returncode != 0 for k in killed)
    assert weights(tmp_path / "killed")["epoch"] == 1
    resumed = [p.wait(180) for p in processes([*fsdp, f"output.dir={tmp_path / 'killed'}", "--resume"], tmp_path)]
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    resumed = weights(tmp_path / "killed")
    assert all(torch.equal(resumed["model"][k], ours["model"][k]) for k in ours["model"]), "FSDP resume is not exact"


def test_fsdp_refuses_an_ema_in_one_sentence(setup, capsys):
    from helpers import run_main

    _, params = setup
    code, _, err = run_main(["--params", params, "--set", "train.strategy=fsdp", "train.ema_decay=0.99"], capsys)
    assert code == 2 and err.count("error: ") == 1 and "train.ema_decay" in err and "fsdp" in err, err

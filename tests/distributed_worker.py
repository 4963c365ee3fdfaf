"""Run by tests/test_training.py under `torchrun --nproc_per_node 2`; not a test module itself.

    torchrun ... tests/distributed_worker.py same-model OUT.json   # finetune, batch norm in train mode
    torchrun ... tests/distributed_worker.py one-fails              # process 1 fails, process 0 waits on it
    torchrun ... tests/distributed_worker.py prune-reads OUT.json   # what each process decodes in a prune

`same-model`: every process fine-tunes the pruned ResNet sample two epochs with batch statistics
(each process's running statistics see only its shard), then process 0 writes every process's
validation history and a checksum of its final weights and buffers, gathered from all.
`prune-reads`: a prune of the ResNet sample on streamed data (160 samples, minibatches of 32), and
each process's count of samples decoded, its metrics and its sample counts, gathered to process 0.
`one-fails`: the failure must end the job (torchrun stops process 0), not hang it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from explainfix_cli import distributed
from explainfix_cli.cli.run import run_body
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import load_data
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.training.finetune import Recipe, finetune

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def same_model(out: Path) -> None:
    rank = distributed.setup("cpu")
    train = load_data(SAMPLES / "digits_train.npz", batch_size=32, batches=4)
    val = load_data(SAMPLES / "digits_val.npz", batch_size=64, batches=2)
    model = open_model(SAMPLES / "resnet.safetensors").model
    prune(model, val, pct=90)
    model, report = finetune(model, train, val, recipe=Recipe(epochs=2))
    state = [t.double().sum().item() for t in model.state_dict().values() if t.is_floating_point()]
    mine = {"metrics": [r.metric for r in report.history], "best_epoch": report.best_epoch, "state": state}
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        out.write_text(json.dumps(everyone))


def prune_reads(out: Path) -> None:
    from explainfix_cli.io.data import Dataset
    from explainfix_cli.io.sources.arrays import ArraySource

    rank = distributed.setup("cpu")
    memory = load_data(SAMPLES / "digits_train.npz")
    data = Dataset(source=ArraySource(memory.x[:160], memory.y[:160]), batch_size=32)
    _, report = prune(open_model(SAMPLES / "resnet.safetensors").model, data, pct=50)
    mine = {"decoded": data.source.decoded, "metric_before": report.metric_before, "metric_after": report.metric_after}
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        out.write_text(json.dumps(everyone))


def one_fails() -> None:
    def body() -> None:
        if distributed.setup("cpu") == 1:
            raise RuntimeError("process 1 gave up")
        dist.barrier()  # process 0 waits for a peer that never comes

    run_body(False, body)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "same-model":
        same_model(Path(sys.argv[2]))
    elif sys.argv[1] == "prune-reads":
        prune_reads(Path(sys.argv[2]))
    else:
        one_fails()

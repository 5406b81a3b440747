"""Table-driven validation: every bad input is rejected with the field path that is wrong."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pretrain_operator.api import PretrainJob, parse_job
from pretrain_trainer.config import SpecError

from tests.conftest import minimal_job, with_stage

BASE = minimal_job()


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split("/")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def _delete(doc: dict[str, Any], path: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split("/")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[last]
    return out


TWO_STAGES = _set(BASE, "spec/stages", [BASE["spec"]["stages"][0]] * 2)

CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("empty stage list", _set(BASE, "spec/stages", []), "spec.stages", "at least 1"),
    ("duplicate stage name", TWO_STAGES, "spec.stages[1].name", "duplicate stage name"),
    (
        "stage name not a DNS label",
        with_stage(BASE, name="Foundation"),
        "spec.stages[0].name",
        "lower-case letters",
    ),
    (
        "data mix names an unknown source",
        with_stage(BASE, dataMix={"web": 1.0}),
        "spec.stages[0].dataMix.web",
        "unknown source; known sources: code, prose",
    ),
    (
        "data mix sums to zero",
        with_stage(BASE, dataMix={"prose": 0, "code": 0}),
        "spec.stages[0].dataMix",
        "sum to a positive",
    ),
    (
        "negative data mix weight",
        with_stage(BASE, dataMix={"prose": -1, "code": 1}),
        "spec.stages[0].dataMix.prose",
        "greater than or equal to 0",
    ),
    (
        "empty data mix",
        with_stage(BASE, dataMix={}),
        "spec.stages[0].dataMix",
        "at least 1",
    ),
    (
        "negative global batch",
        with_stage(BASE, globalBatchSize=-8),
        "spec.stages[0].globalBatchSize",
        "greater than 0",
    ),
    (
        "zero micro batch",
        with_stage(BASE, microBatchSize=0),
        "spec.stages[0].microBatchSize",
        "greater than 0",
    ),
    (
        "global batch not divisible by micro batch",
        with_stage(BASE, globalBatchSize=10, microBatchSize=4),
        "spec.stages[0].globalBatchSize",
        "not divisible by microBatchSize (4)",
    ),
    (
        "minWorkers above maxWorkers",
        _set(BASE, "spec/elastic", {"minWorkers": 4, "maxWorkers": 2}),
        "spec.elastic.minWorkers",
        "exceeds maxWorkers (2)",
    ),
    (
        "stage workers min above max",
        with_stage(BASE, workers={"min": 4, "max": 2}),
        "spec.stages[0].workers.min",
        "exceeds workers.max",
    ),
    (
        "hidden not divisible by heads",
        _set(BASE, "spec/model/heads", 5),
        "spec.model.hidden",
        "not divisible by heads (5)",
    ),
    (
        "odd head dimension",
        _set(_set(BASE, "spec/model/hidden", 60), "spec/model/heads", 4),
        "spec.model.heads",
        "must be even",
    ),
    (
        "kv heads do not divide heads",
        _set(BASE, "spec/model/kvHeads", 3),
        "spec.model.kvHeads",
        "not divisible by kvHeads",
    ),
    (
        "MoE routes to more experts than exist",
        _set(BASE, "spec/model/moe", {"experts": 4, "topK": 8}),
        "spec.model.moe.topK",
        "exceeds experts",
    ),
    ("unknown field", with_stage(BASE, bogus=1), "spec.stages[0].bogus", "unknown field"),
    (
        "string where an integer belongs",
        _set(BASE, "spec/model/layers", "2"),
        "spec.model.layers",
        "valid integer",
    ),
    (
        "NaN learning rate",
        with_stage(BASE, optimizer={"lr": float("nan")}),
        "spec.stages[0].optimizer.lr",
        "finite number",
    ),
    (
        "budget with steps and tokens",
        with_stage(BASE, budget={"steps": 1, "tokens": 1}),
        "spec.stages[0].budget",
        "exactly one",
    ),
    (
        "empty budget",
        with_stage(BASE, budget={}),
        "spec.stages[0].budget",
        "exactly one",
    ),
    (
        "stage sequence longer than the model's",
        with_stage(BASE, seqLen=64),
        "spec.stages[0].seqLen",
        "exceeds model.seqLen (32)",
    ),
    (
        "final lr above the peak",
        with_stage(BASE, optimizer={"lr": 1e-4}, lrSchedule={"finalLr": 1e-3}),
        "spec.stages[0].lrSchedule.finalLr",
        "above the peak lr",
    ),
    (
        "final lr with constant decay",
        with_stage(BASE, lrSchedule={"decay": "constant", "finalLr": 1e-5}),
        "spec.stages[0].lrSchedule.finalLr",
        "no effect",
    ),
    (
        "milestones out of order",
        with_stage(BASE, lrSchedule={"decay": "step", "milestones": [0.8, 0.5]}),
        "spec.stages[0].lrSchedule.milestones",
        "strictly increasing",
    ),
    (
        "milestones on a cosine schedule",
        with_stage(BASE, lrSchedule={"milestones": [0.5]}),
        "spec.stages[0].lrSchedule.milestones",
        "step decay",
    ),
    (
        "warmup as long as the stage",
        with_stage(BASE, lrSchedule={"warmupSteps": 10}),
        "spec.stages[0].lrSchedule.warmupSteps",
        "no step to decay",
    ),
    (
        "freeze names no module",
        with_stage(BASE, freeze=["encoder"]),
        "spec.stages[0].freeze[0]",
        "names no module",
    ),
    (
        "freeze names a layer past the last",
        with_stage(BASE, freeze=["embed", "layers.2"]),
        "spec.stages[0].freeze[1]",
        "layer index must be 0..1",
    ),
    (
        "parameter offload without ZeRO-3",
        with_stage(BASE, offloadParams=True, zeroStage=2),
        "spec.stages[0].offloadParams",
        "zeroStage 3",
    ),
    (
        "fp16 precision",
        with_stage(BASE, precision="fp16"),
        "spec.stages[0].precision",
        "'bf16' or 'fp32'",
    ),
    ("ZeRO stage 4", with_stage(BASE, zeroStage=4), "spec.stages[0].zeroStage", "less than"),
    (
        "duplicate source names",
        _set(BASE, "spec/data/sources/1/name", "prose"),
        "spec.data.sources[1].name",
        "duplicate source",
    ),
    (
        "tensor parallelism that does not divide the heads",
        with_stage(_set(BASE, "spec/nprocPerWorker", 3), parallelism={"tensor": 3}),
        "spec.stages[0].parallelism.tensor",
        "(3) does not divide model.heads (4)",
    ),
    (
        "tensor parallelism that does not divide the kv heads",
        with_stage(
            _set(_set(BASE, "spec/model/kvHeads", 1), "spec/nprocPerWorker", 2),
            parallelism={"tensor": 2},
        ),
        "spec.stages[0].parallelism.tensor",
        "(2) does not divide model.kvHeads (1)",
    ),
    (
        "tensor parallelism without ZeRO",
        with_stage(_set(BASE, "spec/nprocPerWorker", 2), parallelism={"tensor": 2}, zeroStage=0),
        "spec.stages[0].parallelism.tensor",
        "needs zeroStage 1 or 2, not 0: without ZeRO the trainer would clip by one shard's",
    ),
    (
        "tensor and pipeline parallelism together",
        with_stage(_set(BASE, "spec/nprocPerWorker", 4), parallelism={"tensor": 2, "pipeline": 2}),
        "spec.stages[0].parallelism.tensor",
        "tensor and pipeline parallelism in one stage are not built yet",
    ),
    (
        "more pipeline stages than layers",
        with_stage(_set(BASE, "spec/nprocPerWorker", 3), parallelism={"pipeline": 3}),
        "spec.stages[0].parallelism.pipeline",
        "(3) exceeds model.layers (2)",
    ),
    (
        "pipeline that does not divide the layers",
        with_stage(
            _set(_set(BASE, "spec/model/layers", 3), "spec/nprocPerWorker", 2),
            parallelism={"pipeline": 2},
        ),
        "spec.stages[0].parallelism.pipeline",
        "give the split in pipelineLayers",
    ),
    (
        "a pipeline split of the wrong length",
        with_stage(
            _set(BASE, "spec/nprocPerWorker", 2), parallelism={"pipeline": 2, "pipelineLayers": [2]}
        ),
        "spec.stages[0].parallelism.pipelineLayers",
        "has 1 entries; pipeline is 2",
    ),
    (
        "an export path off every writable volume",
        _set(
            _set(BASE, "spec/export", {"path": "/data/model"}),
            "spec/volumes",
            [
                {"name": "data", "claimName": "d", "mountPath": "/data", "readOnly": True},
                {"name": "ckpt", "claimName": "c", "mountPath": "/checkpoints"},
            ],
        ),
        "spec.export.path",
        "/data/model is on no writable volume; spec.volumes mounts /checkpoints",
    ),
    (
        "an export path that climbs out",
        _set(BASE, "spec/export", {"path": "/checkpoints/../etc"}),
        "spec.export.path",
        "'..' is not allowed",
    ),
    (
        "an unknown export format",
        _set(BASE, "spec/export", {"path": "model", "format": "gguf"}),
        "spec.export.format",
        "'hf'",
    ),
    (
        "stage eval without any eval source",
        with_stage(BASE, eval={"intervalSteps": 5}),
        "spec.stages[0].eval",
        "needs data.evalSources",
    ),
    (
        "stage eval names an unknown eval source",
        with_stage(
            _set(BASE, "spec/data/evalSources", [{"name": "held", "path": "h"}]),
            eval={"sources": ["held", "web"]},
        ),
        "spec.stages[0].eval.sources[1]",
        "unknown eval source 'web'; data.evalSources has held",
    ),
    (
        "an eval source that is a training source",
        _set(BASE, "spec/data/evalSources", [{"name": "held", "path": "p"}]),
        "spec.data.evalSources[0].path",
        "is also training source 'prose'",
    ),
    (
        "duplicate eval source",
        _set(
            BASE, "spec/data/evalSources", [{"name": "h", "path": "a"}, {"name": "h", "path": "b"}]
        ),
        "spec.data.evalSources[1].name",
        "duplicate eval source 'h'",
    ),
    (
        "zero eval batches",
        with_stage(
            _set(BASE, "spec/data/evalSources", [{"name": "held", "path": "h"}]),
            eval={"batches": 0},
        ),
        "spec.stages[0].eval.batches",
        "greater than or equal to 1",
    ),
    (
        "a pipeline split that misses layers",
        with_stage(
            _set(BASE, "spec/nprocPerWorker", 2),
            parallelism={"pipeline": 2, "pipelineLayers": [1, 2]},
        ),
        "spec.stages[0].parallelism.pipelineLayers",
        "sums to 3; model.layers is 2",
    ),
    (
        "pipeline parallelism with ZeRO-2",
        with_stage(_set(BASE, "spec/nprocPerWorker", 2), parallelism={"pipeline": 2}, zeroStage=2),
        "spec.stages[0].parallelism.pipeline",
        "needs zeroStage 1, not 2",
    ),
    (
        "expert parallelism without experts",
        with_stage(BASE, parallelism={"expert": 2}),
        "spec.stages[0].parallelism.expert",
        "needs model.moe",
    ),
    (
        "expert parallelism that does not divide the experts",
        with_stage(_set(BASE, "spec/model/moe", {"experts": 4}), parallelism={"expert": 3}),
        "spec.stages[0].parallelism.expert",
        "(3) does not divide model.moe.experts (4)",
    ),
    (
        "expert parallelism with ZeRO-3",
        with_stage(
            _set(BASE, "spec/model/moe", {"experts": 4}), parallelism={"expert": 2}, zeroStage=3
        ),
        "spec.stages[0].parallelism.expert",
        "needs zeroStage 0, 1 or 2, not 3",
    ),
    (
        "a replica larger than a worker",
        with_stage(BASE, parallelism={"tensor": 2}),
        "spec.stages[0].parallelism",
        "tensor x pipeline = 2 processes must divide nprocPerWorker (1)",
    ),
    (
        "no worker count whose data-parallel degree is whole expert groups",
        with_stage(_set(BASE, "spec/model/moe", {"experts": 4}), parallelism={"expert": 2}),
        "spec.elastic",
        "no worker count in 1..1 fits stage 'foundation': expert 2 needs a data-parallel "
        "degree (workers x 1) that is a multiple of expert (2)",
    ),
    (
        "no worker count whose data-parallel degree divides the batch under pipelining",
        with_stage(
            _set(
                _set(BASE, "spec/nprocPerWorker", 2),
                "spec/elastic",
                {"minWorkers": 3, "maxWorkers": 3},
            ),
            parallelism={"pipeline": 2},
        ),
        "spec.elastic",
        "a divisor of the 8 micro-batches (pipeline)",
    ),
    ("missing image", _delete(BASE, "spec/image"), "spec.image", "required field is missing"),
    (
        "bad resource quantity",
        _set(BASE, "spec/resources", {"limits": {"nvidia.com/gpu": "lots"}}),
        "spec.resources.limits[nvidia.com/gpu]",
        "pattern",
    ),
    (
        "job name too long for child object names",
        _set(BASE, "metadata/name", "a" * 46),
        "metadata.name",
        "at most 45 characters",
    ),
    ("wrong kind", _set(BASE, "kind", "Job"), "kind", "expected PretrainJob, got 'Job'"),
    (
        "wrong apiVersion",
        _set(BASE, "apiVersion", "pretrain.dev/v1"),
        "apiVersion",
        "expected pretrain.dev/v1alpha1",
    ),
    ("missing spec", _delete(BASE, "spec"), "spec", "required field is missing"),
]


@pytest.mark.parametrize(
    ("doc", "path", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_invalid_spec_is_rejected_naming_the_field(
    doc: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(SpecError) as caught:
        parse_job(doc)
    matching = [str(p) for p in caught.value.problems if str(p).startswith(f"{path}: ")]
    assert matching, f"no problem at {path}: {caught.value.problems}"
    assert any(words in m for m in matching), matching


def test_every_problem_is_reported_at_once() -> None:
    doc = with_stage(BASE, dataMix={"web": 1}, freeze=["encoder"], seqLen=64)
    doc = _set(doc, "spec/model/heads", 5)
    with pytest.raises(SpecError) as caught:
        parse_job(doc)
    paths = {str(p).split(": ")[0] for p in caught.value.problems}
    assert paths == {
        "spec.model.hidden",
        "spec.stages[0].dataMix.web",
        "spec.stages[0].freeze[0]",
        "spec.stages[0].seqLen",
    }


def test_non_mapping_document_is_rejected_with_its_type() -> None:
    with pytest.raises(SpecError, match="expected a PretrainJob object, got list"):
        parse_job([1, 2])


def test_minimal_job_gets_defaults_that_make_it_runnable() -> None:
    job = parse_job(BASE)
    assert isinstance(job, PretrainJob)
    stage = job.spec.stages[0]
    assert (stage.micro_batch_size, stage.precision, stage.zero_stage) == (1, "bf16", 1)
    assert stage.optimizer.betas == (0.9, 0.95)
    assert job.spec.elastic.max_count == job.spec.elastic.min_workers == 1
    assert job.spec.checkpoint.interval_steps == 100
    assert job.status.phase == "Pending"


def test_quantities_accept_integers_and_strings_alike() -> None:
    doc = _set(BASE, "spec/resources", {"limits": {"nvidia.com/gpu": 8, "memory": "64Gi"}})
    job = parse_job(_set(doc, "spec/nprocPerWorker", 8))
    assert job.spec.resources.limits == {"nvidia.com/gpu": "8", "memory": "64Gi"}
    assert job.spec.resources.gpus() == 8
    assert not list(job.warnings())


def test_gpu_count_differing_from_processes_is_a_warning_not_an_error() -> None:
    job = parse_job(_set(BASE, "spec/resources", {"limits": {"nvidia.com/gpu": 8}}))
    assert [str(w) for w in job.warnings()] == [
        "spec.nprocPerWorker: (1) differs from the 8 GPUs each worker requests"
    ]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec/elastic", {"minWorkers": 3}),  # 8 micro-batches over 3: 3, 3 and 2
        ("spec/elastic", {"minWorkers": 5, "maxWorkers": 7}),
        ("spec/nprocPerWorker", 3),
    ],
)
def test_worker_counts_that_do_not_divide_the_batch_are_valid_and_not_warned_about(
    path: str, value: object
) -> None:
    job = parse_job(_set(with_stage(BASE, globalBatchSize=8), path, value))
    counts = job.spec.worker_counts(job.spec.stages[0])
    assert list(counts.usable) == list(range(counts.low, counts.high + 1))
    assert [str(w) for w in job.warnings()] == []


def test_workers_that_could_only_pad_are_a_warning_naming_the_limit() -> None:
    doc = _set(with_stage(BASE, microBatchSize=2), "spec/elastic", {"maxWorkers": 6})
    warnings = [str(w) for w in parse_job(doc).warnings()]
    assert warnings == [
        "spec.elastic.maxWorkers: (6): globalBatchSize 8 is 4 micro-batches of 2, enough for "
        "4 workers of 1 process(es); above that some processes have no micro-batch, and more "
        "workers never train faster"
    ]


def test_status_with_unreadable_fields_is_reset_not_fatal() -> None:
    doc = {**BASE, "status": {"phase": "Exploded", "step": "many"}}
    assert parse_job(doc).status.phase == "Pending"


def test_status_written_by_another_version_keeps_known_fields() -> None:
    doc = {**BASE, "status": {"phase": "Running", "step": 40, "futureField": {"x": 1}}}
    status = parse_job(doc).status
    assert (status.phase, status.step) == ("Running", 40)


def test_batch_not_divisible_by_micro_batch_is_reported_once() -> None:
    with pytest.raises(SpecError) as caught:
        parse_job(with_stage(BASE, globalBatchSize=10, microBatchSize=4))
    assert [str(p) for p in caught.value.problems] == [
        "spec.stages[0].globalBatchSize: (10) is not divisible by microBatchSize (4)"
    ]

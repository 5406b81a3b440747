"""`pretrainctl validate` and `pretrainctl crd` as a user meets them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pretrain_operator.cli import main

from tests.conftest import EXAMPLES, ROOT, minimal_job, with_stage


def _write(tmp_path: Path, doc: object, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def test_validate_summarises_every_stage_of_a_valid_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "examples" / "tiny-cpu.yaml")]) == 0
    out = capsys.readouterr().out
    for words in (
        "tiny-cpu: valid PretrainJob",
        "stage 0 foundation",
        "stage 2 instruction",
        "100 steps x 16 seqs x 128 tokens",
        "2: 2 per rank, 100%, as fast as 2",
        "warmup 5 to 0.001, cosine decay to 0.0005",
        "prose 80%, code 20%",
    ):
        assert words in out


def test_validate_shows_each_stages_layout_and_data_parallel_degree_per_worker_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", str(ROOT / "examples" / "deepseek-3stage.yaml")]) == 0
    out = capsys.readouterr().out
    for words in (
        "layout  pipeline 8 (layers 12,12,12,12,12,12,12,11): 8 process(es) per replica, "
        "1 replica(s) per worker",
        "128 (data parallel 128): 32 per rank, 100%, as fast as 128",
        "64 (data parallel 64): 64 per rank, 100%",
        "layout  pipeline 2 (layers 48,47): 2 process(es) per replica, 4 replica(s) per worker",
        "16 (data parallel 64): 16 per rank",
    ):
        assert words in out, words


def test_an_invalid_layout_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = with_stage(minimal_job(nprocPerWorker=2), parallelism={"tensor": 2, "pipeline": 3})
    assert main(["validate", str(_write(tmp_path, doc))]) == 2
    err = capsys.readouterr().err
    assert "spec.stages[0].parallelism.pipeline: (3) exceeds model.layers (2)" in err
    assert "spec.stages[0].parallelism: tensor x pipeline = 6 processes must divide" in err


def test_validate_accepts_all_examples_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--quiet", *map(str, EXAMPLES)]) == 0
    assert capsys.readouterr().out.count(": valid") == len(EXAMPLES)


def test_invalid_job_exits_2_listing_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = with_stage(minimal_job(), dataMix={"web": 1}, microBatchSize=0)
    assert main(["validate", str(_write(tmp_path, doc))]) == 2
    err = capsys.readouterr().err
    assert "invalid PretrainJob" in err
    assert "spec.stages[0].microBatchSize: Input should be greater than 0" in err


def test_semantic_errors_are_listed_with_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = with_stage(minimal_job(), dataMix={"web": 1}, freeze=["encoder"])
    assert main(["validate", str(_write(tmp_path, doc))]) == 2
    err = capsys.readouterr().err
    assert "spec.stages[0].dataMix.web: unknown source" in err
    assert "spec.stages[0].freeze[0]: 'encoder' names no module" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("spec: [unclosed\n", "job.yaml:2:1: YAML syntax error"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n",
            "kind: expected PretrainJob",
        ),
        ("", "no YAML document"),
        ("- 1\n- 2\n", "expected a PretrainJob object, got list"),
    ],
    ids=["yaml syntax", "wrong kind", "empty file", "not a mapping"],
)
def test_unreadable_input_gets_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    assert main(["validate", str(_write(tmp_path, content))]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_missing_file_is_reported_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "/nonexistent/job.yaml"]) == 2
    assert "cannot read: No such file or directory" in capsys.readouterr().err


def test_multi_document_files_validate_each_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = with_stage(minimal_job(), globalBatchSize=0)
    text = yaml.safe_dump(minimal_job()) + "---\n" + yaml.safe_dump(bad)
    assert main(["validate", "-q", str(_write(tmp_path, text))]) == 2
    captured = capsys.readouterr()
    assert "(document 1): valid" in captured.out
    assert "(document 2): invalid" in captured.err


def test_crd_command_prints_the_committed_crd(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    assert main(["crd", "--output", str(out)]) == 0
    assert out.read_text() == (ROOT / "crds" / "pretrainjob.yaml").read_text()


def test_console_script_runs_in_a_fresh_interpreter(tmp_path: Path) -> None:
    bad = _write(tmp_path, "kind: [\n")
    result = subprocess.run(
        [sys.executable, "-m", "pretrain_operator", "validate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "YAML syntax error" in result.stderr

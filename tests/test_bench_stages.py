"""bench.stages runs on the fixture model and reports what it ran: the precision and what it compiled."""

from __future__ import annotations

import pytest

from bench import stages
from bench.parity import ParitySet


def test_the_stage_bench_reports_its_precision_and_stages(
    parity: ParitySet, capsys: pytest.CaptureFixture[str]
) -> None:
    stages.main(["--model", str(parity.model_dir), "--blocks", "2", "--warmup", "1"])
    stages.main(["--model", str(parity.model_dir), "--blocks", "2", "--precision", "bf16"])
    fp32, bf16 = capsys.readouterr().out.split("Seed-VC real-time stages")[1:]
    assert "precision fp32; compiled with torch.compile: nothing" in fp32
    assert "precision bf16; compiled with torch.compile: nothing" in bf16
    for report in (fp32, bf16):
        stage_lines = [
            words[0] for words in map(str.split, report.splitlines()) if words[:1] and words[0] in stages.STAGES
        ]
        assert stage_lines == list(stages.STAGES)


def test_the_stage_bench_compiles_only_networks_it_knows(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        stages.parse_args(["--compile", "vocoder"])  # called through a method, not as a module: nothing to compile
    assert "invalid choice: 'vocoder'" in capsys.readouterr().err
    assert stages.parse_args(["--compile", "dit", "content_encoder"]).compile == ["dit", "content_encoder"]

"""`pcim init` (a commented template) and `pcim schema` (JSON Schema of plate.yaml) through the installed CLI."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_pcim
from plates import DEMO


def test_schema_is_json_schema_that_rejects_unknown_keys():
    proc = run_pcim("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert set(schema["properties"]) == {"plate", "model", "explain", "compute", "output", "qc"}
    assert schema["additionalProperties"] is False


@pytest.mark.slow
def test_init_writes_a_commented_template_that_validates_once_filled_in(tmp_path):
    target = tmp_path / "new" / "plate.yaml"
    proc = run_pcim("init", str(target))
    assert proc.returncode == 0, proc.stderr
    text = target.read_text()
    assert text.count("FILL IN") == 3 and "# tokens: {well}" in text
    filled = run_pcim("validate", str(target), "--set", f"plate.images={DEMO / 'images'}",
                      "--set", "plate.pattern={well}_s{field}_w{channel}.tif",
                      "--set", f"model.path={DEMO / 'classifier.ts'}")
    assert filled.returncode == 0, filled.stderr
    assert "24 wells, 48 fields, channels DNA, PH3, Actin" in filled.stdout
    again = run_pcim("init", str(target))  # never overwrites silently
    assert again.returncode == 65 and "exists" in again.stderr and "--force" in again.stderr
    assert run_pcim("init", str(target), "--force").returncode == 0

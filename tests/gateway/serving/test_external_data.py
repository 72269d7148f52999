"""ONNX external data stays inside the version's folder (issue 14, finding 9). Loaded from
bytes, a model's external-data locations resolved against the process's working directory, so
a model could read any file the process can; now a model loads by path and a location that is
absolute, has a ``..`` part or links outside its folder fails the version's load."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np

from tests.support.models import write_external_data_scorer
from tests.support.server import ADMIN, InProcessServer


def index(server: InProcessServer) -> dict[str, dict[str, str]]:
    r = httpx.post(server.url + "/v2/repository/index", headers=ADMIN, json={})
    assert r.status_code == 200, r.text
    return {e["version"]: e for e in r.json() if e["name"] == "scorer"}


def test_external_data_must_stay_in_the_version_folder(tmp_path: Path, demo_repo: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    scorer = root / "scorer"
    secret = tmp_path / "outside" / "secret.bin"  # outside the repository
    write_external_data_scorer(scorer / "1", "weights.bin")  # inside: fine
    write_external_data_scorer(scorer / "2", str(secret), target=secret)  # absolute
    write_external_data_scorer(scorer / "3", "../shared.bin", target=scorer / "shared.bin")
    write_external_data_scorer(scorer / "4", "sub/../../shared.bin", target=scorer / "shared.bin")
    (scorer / "5").mkdir()  # a link inside the folder to another version's data
    (scorer / "5" / "weights.bin").symlink_to(scorer / "1" / "weights.bin")
    write_external_data_scorer(scorer / "5", "weights.bin", target=tmp_path / "unused.bin")
    with InProcessServer(root) as server:
        versions = index(server)
        assert versions["1"]["state"] == "READY", versions["1"]
        for v in ("2", "3", "4", "5"):
            assert versions[v]["state"] == "FAILED", versions[v]
            assert "outside the version's folder" in versions[v]["reason"], versions[v]
        row = np.zeros((1, 32), np.float32).ravel().tolist()
        body = {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": row}]}
        r = httpx.post(server.url + "/v2/models/scorer/versions/1/infer", json=body)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [0.5]
        for v in ("2", "3", "4", "5"):
            r = httpx.post(server.url + f"/v2/models/scorer/versions/{v}/infer", json=body)
            assert r.status_code == 503, r.text

"""A demo that teaches: deploy.predict on a manifest's test split with true labels and accuracy, heads
that disagree flagged, globs, --out JSON/CSV written atomically, a URL refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_deploy import predict_main, tiny_contract, write_image, write_tiny_model

from deploy.labelled import derive_hierarchy, spread

RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)
# The tiny model: red -> coarse c0, fine f5, "red disc"; green -> c1, f6, "green cup cup"; blue -> c2, f0.
ROWS = [  # path, split, coarse, fine, diagnosis, colour
    ("images/t_red.png", "test", "c1", "f5", "red disc", RED),  # coarse head wrong (c0), fine right
    ("images/t_green.png", "test", "c1", "f6", "green cup", GREEN),
    ("images/t_blue.png", "test", "c0", "f1", "", BLUE),  # true c0, predicted c2: wrong
    ("images/a_train.png", "train", "c1", "f5", "", GREEN),  # first alphabetically: never the demo's
    ("images/b_train.png", "train", "c1", "f5", "", GREEN),
    ("images/c_train.png", "train", "c1", "f6", "", GREEN),
    ("images/d_train.png", "train", "c0", "f1", "", RED),
    ("images/e_train.png", "train", "c0", "f1", "", RED),
]


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    with open(root.mkdir(parents=True) or root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "eye", "split", "coarse", "fine", "diagnosis"])
        for i, (path, split, coarse, fine, text, colour) in enumerate(ROWS):
            write_image(root / path, colour)
            w.writerow([path, f"p{i}", "left", split, coarse, fine, text])
    return root / "manifest.csv"


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model")


def test_manifest_predicts_the_test_split_with_truth_and_accuracy(model, dataset, capsys):
    assert predict_main([str(model), "--manifest", str(dataset)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(str(dataset.parent))]
    assert [Path(ln.split(" | ")[0]).name for ln in lines] == ["t_red.png", "t_green.png", "t_blue.png"]
    assert "coarse: c0 (" in lines[0] and "[true: c1, WRONG]" in lines[0] and "[true: c1, ok]" in lines[1]
    assert "[true: f5, ok]" in lines[0] and '[true: "red disc", exact]' in lines[0]
    assert "coarse: c2 (" in lines[2] and "[true: c0, WRONG]" in lines[2] and "[true: f1, in top-5 (#2)]" in lines[2]
    assert ("accuracy on 3 test-split image(s) of " in out and "coarse top-1 33.3 % (n=3)" in out
            and "fine top-1 66.7 % top-5 100.0 % (n=3)" in out and "diagnosis exact 50.0 % (n=2)" in out)


def test_heads_that_contradict_each_other_are_flagged(model, dataset, capsys):
    """In this manifest f5 and f6 belong to c1: the red image's coarse c0 contradicts its fine f5. The
    manifest's labels nest, so the rule comes from them (the tiny contract has no hierarchy)."""
    assert predict_main([str(model), "--manifest", str(dataset)]) == 0
    out = capsys.readouterr().out
    red = next(ln for ln in out.splitlines() if "t_red.png" in ln)
    assert "HEADS DISAGREE: coarse says c0 but fine top-1 f5 belongs to c1" in red
    green = next(ln for ln in out.splitlines() if "t_green.png" in ln)
    assert "DISAGREE" not in green and "1 image(s) where the heads disagree" in out


def test_a_hierarchy_in_the_contract_wins_and_none_flags_nothing(tmp_path, capsys):
    contract = tiny_contract()
    contract.extra["hierarchy"] = {"fine": {"parent": "coarse", "classes": {"f5": "c0", "f6": "c0"}}}
    model = write_tiny_model(tmp_path / "m", sidecar=contract, embed=False)
    green = write_image(tmp_path / "g.png", GREEN)
    assert predict_main([str(model), str(green)]) == 0
    assert "coarse says c1 but fine top-1 f6 belongs to c0" in capsys.readouterr().out
    plain = write_tiny_model(tmp_path / "plain")
    assert predict_main([str(plain), str(green)]) == 0
    assert "DISAGREE" not in capsys.readouterr().out  # nothing to judge by, nothing flagged


def test_hierarchy_is_derived_only_where_tasks_nest():
    tasks = tiny_contract().tasks
    nested = [{"coarse": "c0", "fine": "f1"}] * 2 + [{"coarse": "c1", "fine": "f2"}] * 2 + [{"coarse": "c2", "fine": "f3"}] * 2
    assert derive_hierarchy(tasks, nested) == {"fine": {"parent": "coarse",
                                                        "classes": {"f1": "c0", "f2": "c1", "f3": "c2"}}}
    crossed = nested + [{"coarse": "c1", "fine": "f1"}]  # f1 under two coarse classes: not a hierarchy
    assert derive_hierarchy(tasks, crossed) == {}
    explicit = {"fine_to_coarse": {"f1": "c3"}}  # dataset.yaml's extra wins over the rows
    assert derive_hierarchy(tasks, crossed, explicit)["fine"]["classes"] == {"f1": "c3"}


def test_limit_takes_images_in_turn_from_each_class(dataset):
    from deploy.labelled import read_manifest

    images = read_manifest(dataset, tiny_contract().tasks, split="train")
    picked = spread(images, "coarse", 3)
    assert [i.labels["coarse"] for i in picked] == ["c1", "c0", "c1"]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_out_writes_every_prediction_with_truth(model, dataset, tmp_path, suffix):
    out = tmp_path / "res" / f"predictions{suffix}"
    assert predict_main([str(model), "--manifest", str(dataset), "--out", str(out)]) == 0
    assert not list(out.parent.glob("*.tmp"))
    if suffix == ".json":
        doc = json.loads(out.read_text())
        assert doc["accuracy"]["coarse"] == {"n": 3, "top1": pytest.approx(1 / 3)}
        first = doc["predictions"][0]
        assert first["truth"]["coarse"] == "c1" and first["tasks"]["coarse"]["label"] == "c0"
        assert first["disagreements"] == ["coarse says c0 but fine top-1 f5 belongs to c1"]
    else:
        rows = list(csv.DictReader(out.open()))
        assert [r["coarse_label"] for r in rows] == ["c0", "c1", "c2"]
        assert [r["coarse_true"] for r in rows] == ["c1", "c1", "c0"] and "belongs to c1" in rows[0]["disagreements"]


def test_globs_are_expanded_and_urls_refused_in_one_line(model, dataset, capsys):
    pattern = str(dataset.parent / "images" / "t_*.png")
    assert predict_main([str(model), pattern]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if "t_" in ln]) == 3
    assert predict_main([str(model), "https://example.org/eye.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "https://example.org/eye.jpg: a URL" in err and "manifest" not in err
    assert predict_main([str(model), str(dataset.parent / "images" / "none_*.png")]) == 2


@pytest.mark.parametrize("argv, message", [
    (["x.png", "--manifest", "M"], "not images and --manifest"),
    (["x.png", "--out", "p.txt"], "must end in .json or .csv"),
    (["x.png", "--limit", "0"], "--limit must be >= 1"),
])
def test_bad_combinations_are_usage_errors(model, argv, message, capsys):
    assert predict_main([str(model), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_split_the_manifest_lacks_is_one_clear_error(model, dataset, capsys):
    assert predict_main([str(model), "--manifest", str(dataset), "--split", "val"]) == 2
    assert "no rows in split 'val'; splits present: ['test', 'train']" in capsys.readouterr().err

"""`vit predict` for folders and files: batches, CSV and JSON with timm's columns that the csv and json
modules (and pandas, where installed) read back, a row and a count for each unreadable image, the exit
code, images/s; and int8 on the CPU (torch's dynamic quantization, onnxruntime's for `export`) with its
top-1 agreement with float32."""

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch

from helpers import make_folder, run_main
from vit import ViTConfig, ViTForImageClassification
from vit.quantize import Agreement, dynamic_int8

COLUMNS = ["filename", "index_0", "index_1", "label_0", "label_1", "prob_0", "prob_1", "error"]


def tiny_classifier(**config):
    """A 2-layer width-32 model for 16x16 RGB images with a random (non-zero) head over classes a, b, c."""
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
              patch_size=4, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    model = ViTForImageClassification(ViTConfig(**{**kw, **config}))
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved model and a folder of 7 images (one unreadable), sorted as predict lists them."""
    tmp = tmp_path_factory.mktemp("predict")
    tiny_classifier().save_pretrained(tmp / "model")
    make_folder(tmp / "images", classes=3, per_class=2)
    (tmp / "images" / "class_1" / "broken.png").write_bytes(b"not an image")
    files = sorted(str(p) for p in (tmp / "images").rglob("*.png"))
    return tmp, files


def predict(tmp, capsys, *more):
    return run_main(["predict", "--checkpoint", str(tmp / "model"), str(tmp / "images"), "--topk", "2", *more], capsys)


def test_csv_and_json_hold_timms_columns_a_row_per_image_and_the_reason_for_an_unreadable_one(inputs, capsys):
    tmp, files = inputs
    code, out, err = predict(tmp, capsys, "--out", str(tmp / "preds.csv"), "--batch-size", "4")
    assert code == 1, err  # today's policy: an unreadable image makes it 1, after predicting the rest
    assert out.strip().splitlines()[-1].startswith("predicted 6 image(s) in ") and "images/s on cpu, batch 4" in out
    assert "1 unreadable (their rows say why); wrote " + str(tmp / "preds.csv") in out
    with open(tmp / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS and [r["filename"] for r in rows] == files  # the order predict found them in
    broken = next(r for r in rows if r["filename"].endswith("broken.png"))
    assert broken["error"].startswith("cannot read (") and broken["index_0"] == broken["prob_0"] == ""
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and all(r["label_0"] == "abc"[int(r["index_0"])] for r in good)
    assert all(1 >= float(r["prob_0"]) >= float(r["prob_1"]) > 0 for r in good)

    code, _, err = predict(tmp, capsys, "--out", str(tmp / "preds.json"), "--output", "logits")
    assert code == 1, err
    records = json.loads((tmp / "preds.json").read_text())
    assert [list(r) for r in records] == [["filename", "index", "label", "logit", "error"]] * 7
    by_name = {r["filename"]: r for r in records}
    assert by_name[broken["filename"]]["index"] is None and by_name[broken["filename"]]["error"] == broken["error"]
    for r in good:  # the same top-2 as the CSV, as logits now (softmax of logits keeps the order)
        rec = by_name[r["filename"]]
        assert rec["index"] == [int(r["index_0"]), int(r["index_1"])] and rec["label"] == [r["label_0"], r["label_1"]]
        assert rec["logit"][0] >= rec["logit"][1] and rec["error"] is None


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas is not installed (it is not a dependency)")
def test_pandas_reads_both_files_back_with_the_stated_columns(inputs, capsys):
    import pandas as pd

    tmp, files = inputs
    predict(tmp, capsys, "--out", str(tmp / "pd.csv"))
    predict(tmp, capsys, "--out", str(tmp / "pd.json"))
    table = pd.read_csv(tmp / "pd.csv")
    assert list(table.columns) == COLUMNS and list(table["filename"]) == files
    assert table["prob_0"].notna().sum() == 6 and table["error"].notna().sum() == 1
    records = pd.read_json(tmp / "pd.json")
    assert list(records.columns) == ["filename", "index", "label", "prob", "error"] and list(records["filename"]) == files
    assert all(len(v) == 2 for v in records["prob"].dropna())


def test_batches_do_not_change_the_predictions_and_the_terminal_keeps_its_lines(inputs, capsys):
    tmp, files = inputs
    _, one, _ = predict(tmp, capsys, "--batch-size", "1")
    _, many, err = predict(tmp, capsys, "--batch-size", "32")
    one, many = ([line for line in text.splitlines() if line.startswith(str(tmp / "images"))] for text in (one, many))
    assert [line.split(": ")[0] for line in many] == [f for f in files if not f.endswith("broken.png")]
    for a, b in zip(one, many):  # the same classes, the same probabilities up to float rounding
        (names_a, probs_a), (names_b, probs_b) = (zip(*(pair.split() for pair in line.split(": ")[1].split(", "))) for line in (a, b))
        assert names_a == names_b and np.allclose(np.float64(probs_a), np.float64(probs_b), atol=2e-4)
    assert "broken.png: cannot read" in err


def test_mistakes_are_refused_before_any_model_loads(inputs, capsys, tmp_path):
    tmp, _ = inputs
    for more, words in [(["--out", str(tmp_path / "p.txt")], "must end in .csv or .json"),
                        (["--out", str(tmp_path / "no" / "p.csv")], "does not exist; create it"),
                        (["--batch-size", "0"], "--batch-size 0 must be 1 or more"),
                        (["--int8", "--device", "cuda"], "--int8 runs torch's dynamic int8 quantization, which runs on the CPU only")]:
        code, _, err = predict(tmp, capsys, *more)
        assert code == 2 and words in err and err.count("\n") == 1, err


def test_int8_predictions_come_with_their_agreement(inputs, capsys):
    tmp, _ = inputs
    code, out, err = predict(tmp, capsys, "--int8", "--out", str(tmp / "int8.csv"))
    assert code == 1, err
    assert "int8 (torch dynamic quantization of the Linear layers) agrees with float32 on the top-1 class of " in out
    assert " of 6 image(s) (" in out


def test_dynamic_int8_quantizes_every_linear_and_stays_close():
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = dynamic_int8(model)
    assert not any(type(m) is torch.nn.Linear for m in q.modules())  # the fused q/k/v too
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block; the head
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the float model is untouched
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        want, got = model(x).logits, q(x).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    agreement = Agreement("int8")
    agreement.add(want, got)
    assert agreement.total == 64 and agreement.rate >= 0.9 and "of 64 image(s)" in agreement.line()


def test_agreement_warns_below_its_target():
    agreement = Agreement("int8")
    agreement.add(torch.tensor([[1.0, 0.0]] * 99 + [[0.0, 1.0]]), torch.tensor([[1.0, 0.0]] * 100))
    assert agreement.rate == 0.99 and agreement.warning() == ""
    agreement.add(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert "changed the top-1 class of 2 of these 101 image(s)" in agreement.warning()


@pytest.mark.skipif(any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxscript", "onnxruntime")),
                    reason="onnx, onnxscript or onnxruntime not installed (pip install -r requirements.txt)")
def test_export_int8_writes_a_quantized_graph_and_its_agreement(inputs, capsys, tmp_path):
    import onnx
    import onnxruntime

    tmp, files = inputs
    argv = ["export", "--checkpoint", str(tmp / "model"), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8"]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "--quantize int8 needs --images" in err and not (tmp_path / "m.onnx").exists()
    code, out, err = run_main(argv + ["--images", str(tmp / "images")], capsys)
    assert code == 0, err
    assert "int8 weights (onnxruntime dynamic quantization)" in out and "broken.png: cannot read" in err
    assert "the int8 graph (onnxruntime) agrees with float32 on the top-1 class of " in out and " of 6 image(s)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # the float32 graph it came from is not left behind
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 2 * 4 + 1  # the fused q/k/v, proj, fc1, fc2 per block, and the head
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = ViTForImageClassification.from_pretrained(tmp / "model")(x).logits.numpy()
    assert got.shape == (5, 3) and np.abs(got - want).max() <= 0.05 * np.abs(want).max()

"""CLI smoke tests: eval on a tiny checkpoint, report, fit, bench and error messages."""

import json
import subprocess
import sys

import pytest
from checkpoints import build_tiny_checkpoint
from PIL import Image

from mllmcal.cli import main


def _data(d):
    (d / "images").mkdir(parents=True)
    items = []
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(d / "images" / f"{i}.png")
        items.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour ?\n(A) red\n(B) blue"},
            {"from": "gpt", "value": "AB"[i % 2]}]})
    (d / "test.json").write_text(json.dumps(items))
    (d / "calib.json").write_text(json.dumps(items))


def test_eval_report_fit_via_cli(tmp_path, capsys):
    _data(tmp_path / "data")
    model = build_tiny_checkpoint(tmp_path / "m", ["What colour ? red blue"], multimodal=False)
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out),
               "--no-progress", "--no-plots", "--batch-size", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ece_after_temperature" in text and "report:" in text
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["n_items"] == 6 and summary["modality"] == "text"
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file() and "accuracy" in capsys.readouterr().out
    assert main(["fit", "--model", str(model), "--data", str(tmp_path / "data"),
                 "--out", str(out), "--temperature-method", "onepass"]) == 0
    fit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fit["temperature"] > 0 and fit["n_items"] == 6 and fit["method"] == "onepass"
    # the old name of the one-pass fit still works, says it is deprecated, means onepass
    with pytest.warns(DeprecationWarning, match="onepass"):
        assert main(["fit", "--model", str(model), "--data", str(tmp_path / "data"),
                     "--out", str(out), "--temperature-method", "newton"]) == 0
    captured = capsys.readouterr()
    old = json.loads(captured.out.strip().splitlines()[-1])
    assert "newton is deprecated" in captured.err
    assert old["method"] == "onepass" and old["temperature"] == fit["temperature"]


def test_broken_inputs_give_clear_messages(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('[{"id": 1,\n "question": }]')
    model = build_tiny_checkpoint(tmp_path / "m", ["x"], multimodal=False)
    rc = main(["eval", "--model", str(model), "--test", str(tmp_path / "bad.json"),
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "bad.json:2: invalid JSON" in capsys.readouterr().err
    _data(tmp_path / "data")
    rc = main(["eval", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a local checkpoint directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point_and_bench():
    r = subprocess.run([sys.executable, "-m", "mllmcal", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "bench" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mllmcal", "bench", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0


def test_demo_report_names_the_model_demo(tmp_path, monkeypatch, capsys):
    import mllmcal.demo
    import mllmcal.demo.train as demo_train

    _data(tmp_path / "data")
    model = build_tiny_checkpoint(tmp_path / "model", ["What colour ? red blue"], multimodal=False)
    monkeypatch.setattr(demo_train, "get_demo", lambda *a, **k: (model, tmp_path / "data"))
    # the CLI resolves `--model demo` through the demo's public demo_model_dir()
    monkeypatch.setattr(mllmcal.demo, "demo_model_dir", lambda: model)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["model"] == "demo" and report["models"][0]["name"] == "demo"
    assert "model: demo" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    _data(tmp_path / "data")
    model = build_tiny_checkpoint(tmp_path / "m", ["What colour ? red blue"], multimodal=False)
    (tmp_path / "afile").write_text("x")
    base = ["eval", "--model", str(model), "--no-progress", "--no-plots"]
    assert main([*base, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; --out names the output directory" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in (err := capsys.readouterr().err) and "no such directory" in err
    assert main([*base, "--test", str(tmp_path / "no.json"), "--out", str(tmp_path / "o")]) == 2
    assert "--test" in (err := capsys.readouterr().err) and "no such file" in err
    for lim in ("0", "-3"):
        assert main([*base, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                     "--limit", lim]) == 2
        assert "--limit must be a positive number" in capsys.readouterr().err
    assert main([*base, "--model", f"{model},colour=red", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "is not key=value" in capsys.readouterr().err
    for bad in ("[1, 2]", '{"summary": {}}', '{"summary": {}, "models": [{"name": "x"}]}'):
        (tmp_path / "r").mkdir(exist_ok=True)
        (tmp_path / "r" / "report.json").write_text(bad)
        assert main(["report", str(tmp_path / "r")]) == 2
        assert "not an mllmcal report" in capsys.readouterr().err


def test_side_by_side_models_with_one_failing(tmp_path, capsys):
    _data(tmp_path / "data")
    a = build_tiny_checkpoint(tmp_path / "a" / "model", ["What colour ? red blue"], multimodal=False)
    b = build_tiny_checkpoint(tmp_path / "b" / "model", ["What colour ? red blue"], multimodal=False,
                              seed=3)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(a), "--model", f"{b},dtype=float32", "--model", str(broken),
               "--data", str(tmp_path / "data"), "--out", str(out), "--no-progress", "--no-plots",
               "--no-idk"])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["a/model", "b/model"]  # folders that share a name stay apart
    assert [f["name"] for f in report["failed"]] == ["broken"]
    assert "a/model:" in text and "b/model:" in text and "failed: broken" in text
    assert "## Models that failed" in (out / "report.md").read_text()
    assert report["models"][0]["modalities"]["text"] != report["models"][1]["modalities"]["text"]


def test_eval_reads_parquet_with_column_flags(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    n = 6
    table = pa.table({"qid": [f"p{i}" for i in range(n)], "prompt": ["What colour ?"] * n,
                      "choices": [["red", "blue"]] * n, "label": [i % 2 for i in range(n)]})
    pq.write_table(table, tmp_path / "data" / "test.parquet")
    model = build_tiny_checkpoint(tmp_path / "m", ["What colour ? red blue"], multimodal=False)
    rc = main(["eval", "--model", str(model), "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "out"), "--no-progress", "--no-plots", "--no-idk",
               "--question-column", "prompt", "--options-column", "choices",
               "--answer-column", "label", "--id-column", "qid"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["test"]["n_items"] == n and report["data"]["test"]["n_skipped"] == 0


def test_protocol_preset_keeps_the_options_given_with_it(tmp_path, capsys, caplog):
    """--protocol paper sets its four options; one given on the command line as well wins,
    and the run says so; with neither, the documented defaults hold."""
    _data(tmp_path / "data")
    model = build_tiny_checkpoint(tmp_path / "m", ["What colour ? red blue"], multimodal=False)
    base = ["eval", "--model", str(model), "--data", str(tmp_path / "data"), "--no-progress",
            "--no-plots", "--no-idk"]
    cases = {
        "preset": (["--protocol", "paper"], ("letter", 20, 10, "grid")),
        "kept": (["--protocol", "paper", "--n-bins", "5", "--temperature-method", "onepass"],
                 ("letter", 20, 5, "onepass")),
        "plain": (["--max-new-tokens", "7"], ("letter", 7, 10, "grid")),
    }
    for name, (flags, want) in cases.items():
        caplog.clear()
        out = tmp_path / name
        assert main([*base, "--out", str(out), *flags]) == 0
        used = json.loads((out / "report.json").read_text())["config"]
        got = (used["method"], used["max_new_tokens"], used["n_bins"], used["temperature_method"])
        assert got == want, name
        said = "n_bins=5" in caplog.text and "temperature_method='onepass'" in caplog.text
        assert said == (name == "kept"), caplog.text
    capsys.readouterr()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port that was just free on 127.0.0.1, closed again
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("m"), ["What colour ? red blue"],
                                 multimodal=False)


def _cuda_device_not_here() -> str:
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("case", ["cuda", "banana", "no-dev", "proposer", "n-test", "n-calib"])
def test_impossible_settings_fail_before_any_work(case, tiny_text_model, tmp_path, capsys,
                                                  monkeypatch):
    """--device, --optimize-prompts without a dev split and an unreachable --proposer are
    errors before any data, model or scoring; --n-test/--n-calib below 1 are errors, not
    slices from the end."""
    import mllmcal.demo.train as demo_train
    import mllmcal.eval.runner as runner

    _data(tmp_path / "data")  # test and calib, no dev
    model = tiny_text_model

    def no_scoring(*a, **k):
        raise AssertionError("scored before the settings were checked")

    monkeypatch.setattr(runner, "score_items", no_scoring)
    out = tmp_path / "o"
    base = ["eval", "--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out),
            "--no-progress", "--no-plots"]
    if case in ("cuda", "banana"):
        device = _cuda_device_not_here() if case == "cuda" else "banana"
        argv, said = [*base, "--device", device], f"--device {device if case == 'cuda' else repr(device)}"
    elif case == "no-dev":
        argv, said = [*base, "--optimize-prompts"], "--optimize-prompts needs a dev split"
    elif case == "proposer":
        (tmp_path / "data" / "dev.json").write_text((tmp_path / "data" / "test.json").read_text())
        url = f"http://127.0.0.1:{_closed_port()}/v1"
        argv = [*base, "--optimize-prompts", "--proposer", url]
        said = f"--proposer {url}: cannot reach the endpoint"
    else:
        monkeypatch.setattr(demo_train, "get_demo", lambda *a, **k: (model, tmp_path / "data"))
        argv = ["demo", "--out", str(out), "--no-progress", f"--{case}", "-3"]
        said = f"--{case} must be a positive number of items, got -3"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not list(out.glob("cache/*.pt"))


def test_deeply_nested_json_data_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    model = build_tiny_checkpoint(tmp_path / "m", ["x"], multimodal=False)
    rc = main(["eval", "--model", str(model), "--test", str(tmp_path / "deep.json"),
               "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "nested too deeply" in err and "Traceback" not in err


def _vlmevalkit_tsv(path, n=8, with_index=True):
    """A VLMEvalKit TSV as its Development.md lays it out (base64 PNGs, hint, categories)."""
    import base64
    import io

    cols = (["index"] if with_index else []) + ["image", "question", "hint", "A", "B", "C",
                                                "answer", "category", "l2-category", "split"]
    lines = ["\t".join(cols)]
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(buf, format="PNG")
        row = {"index": str(i), "image": base64.b64encode(buf.getvalue()).decode(),
               "question": "What colour ?", "hint": "look" if i % 2 else "", "A": "red",
               "B": "blue", "C": "" if i % 3 else "green", "answer": "AB"[i % 2],
               "category": ["colour", "shape"][i % 2], "l2-category": "perception",
               "split": "dev"}
        lines.append("\t".join(row[c] for c in cols))
    path.write_text("\n".join(lines) + "\n")


def test_format_flag_reads_a_layout_its_columns_do_not_name(tiny_text_model, tmp_path, capsys):
    """Without ``index`` the columns name no layout: an error that says to pass --format;
    ``--format vlmevalkit`` reads it (eval and fit)."""
    tsv = tmp_path / "bench.tsv"
    _vlmevalkit_tsv(tsv, with_index=False)
    base = ["eval", "--model", str(tiny_text_model), "--test", str(tsv), "--calib", str(tsv),
            "--out", str(tmp_path / "o"), "--no-progress", "--no-plots", "--no-idk"]
    assert main(base) == 2
    assert "--format" in capsys.readouterr().err
    assert main([*base, "--format", "vlmevalkit"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["config"]["format"] == "vlmevalkit"
    assert report["data"]["test"]["n_items"] == 8 and report["data"]["test"]["n_skipped"] == 0
    capsys.readouterr()
    assert main(["fit", "--model", str(tiny_text_model), "--calib", str(tsv), "--format",
                 "vlmevalkit", "--modality", "text", "--out", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_items"] == 8
    with pytest.raises(SystemExit):  # argparse names the choices
        main([*base, "--format", "csv"])
    assert "invalid choice" in capsys.readouterr().err


def test_readme_commands_use_real_flags():
    """Every ``mllmcal`` command in the README's shell blocks parses, and the benchmark-files
    section has one command per toolkit layout (tests/test_readme.py runs the Python blocks)."""
    import re
    import shlex
    from pathlib import Path

    from mllmcal.cli import build_parser
    from mllmcal.eval.formats import FORMATS

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"(?:^|[\s/])mllmcal\s+((?:demo|eval|fit|report)\b.*)", line)
            if m:
                commands.append(shlex.split(m.group(1), comments=True))
    assert len(commands) >= 8
    formats = []
    for argv in commands:
        if argv[0] in ("demo", "eval", "fit", "report"):
            args = build_parser().parse_args(argv)  # SystemExit on an unknown flag
            formats.append(getattr(args, "format", None))
    assert set(FORMATS) <= set(formats)

"""The team commands: team settings, gold marking (and import --gold), agreement and the
leaderboard as JSON, and the full export's gold and lineage columns."""
from __future__ import annotations

import json

import pandas as pd

from rpo_app.adapters import BASE_LABEL
from rpo_app.cli import main
from rpo_app.config import TeamSettings
from rpo_app.store import Store


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_team_settings_command_sets_checks_and_shows(data_dir, capsys):
    rc, out, _ = _run(capsys, "team", "--data-dir", str(data_dir), "--overlap", "2",
                      "--recheck-rate", "0.05")
    assert rc == 0 and "overlap 2" in out and "recheck rate 0.05" in out
    rc, _, err = _run(capsys, "team", "--data-dir", str(data_dir), "--gold-rate", "0.9")
    assert rc == 2 and "gold rate is a share from 0 to 0.5" in err and "nothing was changed" in err
    assert TeamSettings.load(Store(data_dir)) == TeamSettings(2, 0.1, 0.05)


def test_gold_import_mark_and_errors(data_dir, tmp_path, capsys):
    pairs = tmp_path / "gold.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "good", "rejected": "bad"})
                             + "\n" for i in range(3)))
    rc, out, _ = _run(capsys, "import", str(pairs), "--data-dir", str(data_dir), "--gold",
                      "--annotator", "lead")
    assert rc == 0 and "marked 3 judgments as gold" in out
    store = Store(data_dir)
    assert store.gold_ids() == {1, 2, 3}
    rc, out, _ = _run(capsys, "gold", "unmark", "2", "--data-dir", str(data_dir))
    assert rc == 0 and store.gold_ids() == {1, 3}
    rc, out, _ = _run(capsys, "gold", "mark", "2", "3", "--data-dir", str(data_dir))
    assert "marked 1 judgments as gold (1 were already)" in out
    rc, _, err = _run(capsys, "gold", "mark", "7", "--data-dir", str(data_dir))
    assert rc == 2 and "no judgment #7" in err and store.gold_ids() == {1, 2, 3}
    rc, _, err = _run(capsys, "gold", "mark", "x", "--data-dir", str(data_dir))
    assert rc == 2 and "not a judgment id" in err
    rc, out, _ = _run(capsys, "gold", "list", "--data-dir", str(data_dir))
    assert out.strip() == "3 gold judgments: 1 2 3"


def test_agreement_and_leaderboard_as_json_and_the_full_export(data_dir, tmp_path, capsys):
    store = Store(data_dir)
    for k in range(6):
        pid, _ = store.add_prompt(f"Question {k}?", "chat")
        base, _ = store.add_response(pid, f"base {k}", "chat", model="m")
        tuned, _ = store.add_response(pid, f"tuned {k}", "chat", model="m", adapter="tuned")
        for who in ("ada", "bob"):
            verdict = "b" if (who == "ada" or k < 4) else "a"  # bob disagrees on 2 of 6
            store.add_judgment("paired", base, tuned, verdict, who, source="blind-chat",
                               a_side="left")
    rc, out, _ = _run(capsys, "agreement", "--data-dir", str(data_dir), "--json")
    rep = json.loads(out)
    kappa = rep["kappa"][0]
    assert rc == 0 and (kappa["annotator_1"], kappa["annotator_2"], kappa["items"]) == ("ada", "bob", 6)
    assert kappa["agree_share"] == 4 / 6
    effect = tmp_path / "effect.json"
    effect.write_text(json.dumps({"summary": [{"judge": "concise", "loss": "rpo-paired", "seeds": 3,
                                               "win_rate": 0.8, "win_rate_std": 0.05}]}))
    rc, out, _ = _run(capsys, "leaderboard", "--data-dir", str(data_dir), "--json",
                      "--bench", str(effect), "--bootstrap", "50")
    board = {r["model"]: r for r in json.loads(out)["leaderboard"]}
    assert board["tuned"]["wins"] == 10 and board[BASE_LABEL]["rating"] == 1000
    assert board["tuned"]["rating"] > 1000
    assert json.loads(out)["bench_effect"][0]["source"] == "bench-effect, simulated judge concise"
    rc, _, err = _run(capsys, "leaderboard", "--data-dir", str(data_dir), "--bench",
                      str(tmp_path / "missing.json"))
    assert rc == 2 and "cannot read bench-effect results" in err
    store.record_run("r1", {}, "/runs/r1", state="finished")
    store.record_lineage("r1", [1, 2], [3])
    store.mark_gold([1], by="lead")
    out_file = tmp_path / "full.csv"
    assert _run(capsys, "export", "--data-dir", str(data_dir), "--format", "full",
                "--out", str(out_file))[0] == 0
    df = pd.read_csv(out_file).set_index("judgment_id")
    assert bool(df.loc[1, "gold"]) and not bool(df.loc[2, "gold"])
    assert json.loads(df.loc[3, "used_by_runs"]) == [{"run_id": "r1", "role": "held_out", "adapter": None}]
    assert json.loads(df.loc[4, "used_by_runs"]) == []

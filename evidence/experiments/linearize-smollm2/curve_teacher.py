"""Adds the teacher's perplexity on a run's curve windows to its result.json and redraws its curve (run once on
runs/lz-hybrid, whose training predates evaluate() recording it)."""
import json, sys
from pathlib import Path
import torch
from linear_transformers.linearize.transfer import load_teacher, perplexity, report
out = Path(sys.argv[1])
r = json.loads((out / "result.json").read_text())
data = torch.load(out / "data.pt", weights_only=True)
_, teacher = load_teacher()
r["curve_teacher_ppl"] = perplexity(teacher, data["held_out"][: r["settings"]["curve_windows"]])
r["curve_teacher_ppl_added_by"] = "python evidence/experiments/linearize-smollm2/curve_teacher.py " + str(out) + " (after the run; same code as evaluate())"
(out / "result.json").write_text(json.dumps(r, indent=2) + "\n")
report(out)
print(r["curve_teacher_ppl"])

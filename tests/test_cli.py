"""The README's main job runs and reports what it claims."""

from jax_nvfp4.__main__ import main


def test_demo_runs_and_reports(capsys):
  assert main(["demo", "--n", "96", "--k", "64", "--m", "3"]) == 0
  out = capsys.readouterr().out
  assert "backend:" in out
  assert "3.55x smaller" in out  # 96*64*2 bytes vs 96*32 + 96*4 + 4
  err = float(out.split("(kernel error):")[1].split()[0])
  assert err < 5e-3  # only the bf16 output rounding separates it from the float64 product

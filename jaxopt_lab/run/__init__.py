"""The run layer, above the composer: one way to build a run (`build.py`: `build_run`,
`load_run`), what training it needs (`training.py`), the loop (`loop.py`), its summary
(`summary.py`) and the run directory's bookkeeping (`rundir.py`)."""

"""Procedures of several runs, above the run layer: a teacher trained before its student
(`train.py`, home of `train_and_evaluate`), lottery-ticket rewinding (`lottery.py`), width
search by masking (`nas.py`), a channel-pruned run shrunk into a run of its own (`shrink.py`)
and a run converted to its quantized serving form (`convert.py`)."""

"""Character-level language model on the Python standard library's source (`python_text`): a
causal Transformer (2 pre-LN blocks, width 128, 4 heads), next-byte cross-entropy, Adam.

    jaxopt-lab train --config configs/python_text_lm.py --workdir runs/python_text_lm

Sized to train in about ten to fifteen minutes on an idle two-core CPU. Smoke (a minute or two;
it skips the steps_per_call timing and the latency measurement):

    jaxopt-lab train --config configs/python_text_lm.py --workdir runs/python_text_smoke \
        --config.train.steps=100 --config.train.eval_every=50 --config.model.depth=1 \
        --config.train.steps_per_call=10 --config.train.measure=False

The loss is the mean over tokens of -log p(next byte), in nats; the evaluation also reports it in
bits per character (`bits_per_char`) and the next-byte accuracy. The text is the local
interpreter's standard library, so Python versions see slightly different text (see
`builders.PythonText`).
"""

from jaxopt_lab import default_config, model_config


def get_config():
    config = default_config()
    config.data.name = "python_text"
    config.data.batch_size = 32  # sequences of 128 bytes: 4096 tokens a step
    config.model = model_config("transformer_lm", dim=128, depth=2, heads=4, mlp_dim=512,
                                max_len=128)
    config.optim.name = "adam"
    config.optim.lr = 1e-3
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 200
    config.optim.grad_clip = 1.0
    config.train.steps = 2000  # ~4.5 epochs of the 14,159 training sequences
    config.train.eval_every = 500
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    config.train.eval_batch_size = 256
    return config

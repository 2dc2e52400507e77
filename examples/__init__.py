"""The example configs, installed as ``fastrlhf.examples`` (see setup.py) so that an
installed fastrlhf finds ``demo.yaml`` without a checkout."""

"""The experiment configs: `python -m sit_jax.main --config=configs/NAME.py[:ARG]`.

A package so that the configs import `configs.common` wherever sit_jax is installed.
"""

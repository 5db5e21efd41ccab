"""Evaluation of a running llada-serve with lm-evaluation-harness (the
optional ``eval`` extra): the ``llada-serve`` lm-eval model
(``lm_eval_adapter``), the ``llada-serve eval`` command (``cli``), and
local task files built from the demo model's held-out items (``tasks/``)."""

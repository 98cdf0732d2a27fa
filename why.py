"""
why.py -- the token-level gradient as numbers. OPTIONAL READING: `python nsr.py --demo-gradient` prints
gradient_demo(); docs/why.md says why PSR and NSR differ although their expected gradients agree.

    gradient_demo(lr, lam) -> the table: one SGD step on the logits of a 5-token softmax under PSR, NSR and
        W-REINFORCE (nsr's one loss, L = -(1/Z) sum_i w_i log pi(y_i)), and the exact threshold below which a token LOSES
        probability under NSR although its logit rises.
"""

from __future__ import annotations

import torch


def gradient_demo(lr: float = 1.0, lam: float = 0.1) -> str:
    """--demo-gradient: one SGD step on the logits of a 5-token distribution, as a printed table: the
    probabilities before, after one PSR step and one NSR step on the same sampled token y, and after one
    W-REINFORCE step on two samples (y judged wrong, y2 correct)."""
    names, prior = "abcde", torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    y, y2 = 1, 0                                       # sampled token "b"; for W-REINFORCE also "a"

    def sgd_step(samples):                             # samples: [(token, weight)], one position each
        z = prior.log().clone().requires_grad_(True)   # logits (V,) whose softmax is the prior
        logp = torch.log_softmax(z, dim=-1)
        tokens, weights = torch.tensor([t for t, _ in samples]), torch.tensor([w for _, w in samples])
        loss = -(weights * logp[tokens]).sum() / len(samples)   # nsr's one loss L, Z = the samples (1 token each)
        loss.backward()
        with torch.no_grad():
            return torch.softmax(z - lr * z.grad, dim=-1), -lr * z.grad  # SGD on the logits

    psr, nsr, wr = sgd_step([(y, 1.0)]), sgd_step([(y, -1.0)]), sgd_step([(y, -1.0), (y2, lam)])
    table = [("probabilities before", prior), (f"after PSR on {names[y]} (w=+1)", psr[0]),
            (f"after NSR on {names[y]} (w=-1)", nsr[0]),
            (f"after W-REINFORCE: {names[y]} wrong (w=-1), {names[y2]} right (w=+{lam}); Z=2", wr[0]),
            ("NSR logit change = -lr*(1[v=y]-pi_v)", nsr[1])]
    width = max(len(label) for label, _ in table)
    lines = [f"one SGD step (lr={lr}) on the logits z of pi = softmax(z); sampled token y = {names[y]!r}",
             " " * width + "  " + "  ".join(f"{n:>6}" for n in names)]
    for label, values in table:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:+6.3f}" if label.startswith("NSR logit")
                                                      else f"{v:6.3f}" for v in values.tolist()))
    bar = float((prior * nsr[1].exp()).sum().log()) / lr   # pi_v' > pi_v  <=>  lr pi_v > log sum_u pi_u e^dz_u
    lost = ", ".join(names[v] for v in range(5) if v != y and prior[v] < bar)
    lines.append("PSR sharpens onto y. NSR lowers z_y by lr*(1-pi_y) and raises every other LOGIT by lr*pi_v, but\n"
                 f"the PROBABILITIES do not follow the prior: v != y gains iff pi_v > log(sum_u pi_u e^dz_u) / lr = "
                 f"{bar:.3f}\n(the unlikely {lost} LOSE; docs/why.md). W-REINFORCE's weights are divided by Z = 2.")
    return "\n".join(lines)

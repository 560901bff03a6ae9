"""The method zoo: the field's quantizers behind ``quant.method``, sharing GDNSQ's whole harness.

Each module registers one method with ``gdnsq.quant.methods.register_method``; ``gdnsq.quant`` imports
this package once, so every method is selectable. See ``common`` for what the zoo's quantizers share.

=========  =====================================================================================
lsq        LSQ: learned step, gradient scale 1/sqrt(N·Q_p)
dorefa     DoReFa: tanh-normalised weights, [0, 1]-clipped activations, straight-through
pact       PACT: learnable activation clip α (optional L2), DoReFa weights
pege       PEGE: log-curriculum element-wise replacement + discretization-error loss (LSQ forward)
bnnpp      BNN++ / ProxConnect++: sign-Swish forward annealed to sign, matching backward (W1A1 only)
codeq      CoDeQ: learnable dead zone that prunes, uniform grid outside; sparsity / entropy stats
=========  =====================================================================================
"""

from . import bnnpp, codeq, dorefa, lsq, pact, pege  # noqa: F401  (registration side effects)

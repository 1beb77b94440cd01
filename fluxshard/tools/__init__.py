"""The `fluxshard` verbs, one module each (run, demo, synth, motion, serve, train_demo, profile,
export), and the argument groups they share (:mod:`fluxshard.tools.args`).

The top layer: a verb module may import anything (the core, the server, the SDK, the edge runtime,
the trainer); nothing below imports a verb module. The library functions a verb calls live in the
module that owns the job (``edge_runtime.run.run``, ``fluxshard.synth.make_clip``, ...); what stays
here is parsing, checking and printing, and the latency profile (:mod:`.profile`): it measures the
server's sessions, a tritonserver and the SDK's client, so it sits above all of them.
tests/test_package_direction.py holds the rules.
"""

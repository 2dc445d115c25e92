"""What ``gradcomp demo`` and the ``gradcomp bench`` commands share: the methods they compare
(``methods``: one registry and parser of method specs, and attaching a method to a model),
how they start their ranks (``launch``) and the digits task's data and MLP (``digits``).

Nothing here is imported by ``import gradcomp``; each command imports what it uses.
"""

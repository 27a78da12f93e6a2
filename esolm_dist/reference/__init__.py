"""The Eso-LM authors' released checkpoints (github s-sahoo/Eso-LMs): their Lightning ``.ckpt``
files (``lightning_file``), their adaLN DiT and how it folds into our block (``dit``), and the
import / reference-format export that joins the two (``convert``; CLI: ``esolm-convert import``,
``esolm-convert export --format reference``).
"""

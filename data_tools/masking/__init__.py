"""Masking: turning a tokenized document's chunks into BART or PEGASUS training examples.

Each rule is written once, as a kernel (data_tools.compiled: numba, or the same code as Python)
that both the mask stage (data_tools.mask, a block of documents at a time) and the trainer's
online masking (one chunk at a time) call:

- ``recipe``: :class:`~data_tools.masking.recipe.MaskRecipe`, what to do to a chunk, and the presets;
- ``chunking``: how a document is packed into chunks;
- ``bart``: text infilling, sentence permutation, insertion and rotation of one chunk;
- ``pegasus``: gap sentence selection (lead, random, principal by ROUGE-1) and the example;
- ``streams``: the random numbers, keyed by (seed, pass, document[, chunk]);
- ``blocks``: the mask stage's examples of a block of documents;
- ``online``: chunk i of a tokenized corpus, by index, for online masking;
- ``vocab``: what masking needs to know of the vocab.

Nothing here writes a stage's output or imports a stage: the trainer masks online without
data_tools.mask, the mask stage's command line.
"""

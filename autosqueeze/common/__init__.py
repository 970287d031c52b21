"""Plain utilities that know nothing of models, plans or studies: the error types, silencing a
library's output, time limits, the one walk over nested batches and outputs, and content hashes
for caches. Every stage may import this one; it imports none of them.
"""

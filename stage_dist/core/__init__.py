"""Infrastructure every layer uses: typed config and its command lines, errors and exit codes, the
one command wrapper, safe outputs, user paths, atomic files, progress. Imports nothing else of
stage_dist.
"""

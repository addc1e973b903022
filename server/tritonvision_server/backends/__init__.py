"""Python-backend step models of the cpu profile; each repository's ``model.py`` imports one of these."""

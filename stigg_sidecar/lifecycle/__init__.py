"""The process's lifecycle leaves: the reactor's types (`reactor`), bind errors (`listening`), the
one stop budget (`stopping`), the garbage-collector policy (`gcpolicy`) and the one wording
for a file a setting names that cannot be read (`files`).

Every package may import these; they import nothing of ours but entitlements' `untrack`, so the
assembly on top (`process/`) and the parts below it never meet in a cycle.
"""

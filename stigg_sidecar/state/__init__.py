"""Durable local state under STATE_DIR: the directory and its lock, and the cache snapshot.

The write spool's file lives in the same directory but belongs to `stigg_sidecar.delivery`.
"""

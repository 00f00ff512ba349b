"""The store several PBXs of one portal share: PostgreSQL (psycopg 3), selected by `[storage] url`.

Imported only when the url is set: a call step on SQLite never loads psycopg.
"""

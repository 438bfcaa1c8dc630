-- Version 2 of the event log (emitterd 0.1: one row per event), kept to test its migration.
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    position  INTEGER PRIMARY KEY,
    stream    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    type      TEXT NOT NULL,
    tags      BLOB,
    body      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    stream  TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_ids (
    id       TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    version  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    key        TEXT PRIMARY KEY,
    spec       BLOB NOT NULL,
    desired    TEXT NOT NULL,
    checkpoint INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parked (
    key      TEXT NOT NULL,
    position INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    PRIMARY KEY (key, position)
) WITHOUT ROWID;

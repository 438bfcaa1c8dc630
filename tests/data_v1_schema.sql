
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    position  INTEGER PRIMARY KEY,
    stream    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    type      TEXT NOT NULL,
    tags      BLOB,
    client_id TEXT,
    body      BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_stream_version ON events (stream, version);
CREATE UNIQUE INDEX IF NOT EXISTS events_client_id ON events (client_id) WHERE client_id IS NOT NULL;
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


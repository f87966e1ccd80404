//! Ordered schema migrations. `PRAGMA user_version` holds how many have been applied; a
//! migration is never edited once released, only appended.

/// Migration `i` takes the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r"
    CREATE TABLE policies (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        caller_pattern TEXT NOT NULL,
        target_pattern TEXT NOT NULL,
        method_pattern TEXT NOT NULL,
        decision INTEGER NOT NULL,
        expires_unix_ms INTEGER NOT NULL,
        created_at_unix_ms INTEGER NOT NULL,
        p2p_mode TEXT NOT NULL,
        relay_mode TEXT NOT NULL
    );
    CREATE INDEX policies_by_tenant ON policies(tenant, seq);

    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts_unix_ms INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        caller TEXT NOT NULL,
        target TEXT NOT NULL,
        method TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        stream_id TEXT NOT NULL,
        mac BLOB NOT NULL
    );
    CREATE INDEX audit_by_tenant_ts ON audit(tenant, ts_unix_ms);

    CREATE TABLE enrollment_tokens (
        hash TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        role TEXT NOT NULL,
        agent_uuid TEXT NOT NULL,
        relay_region TEXT NOT NULL,
        relay_id TEXT NOT NULL,
        created_at_unix_ms INTEGER NOT NULL,
        expires_unix_ms INTEGER NOT NULL,
        used_at_unix_ms INTEGER
    );

    CREATE TABLE revocations (
        uri TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        revoked_at_unix_ms INTEGER NOT NULL
    );

    CREATE TABLE issued_certs (
        serial TEXT PRIMARY KEY,
        uri TEXT NOT NULL,
        issued_at_unix_ms INTEGER NOT NULL,
        not_after_unix_ms INTEGER NOT NULL
    );

    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        agent_uri TEXT NOT NULL,
        relay_id TEXT NOT NULL,
        lease_kind TEXT NOT NULL,
        state INTEGER NOT NULL,
        created_at_unix_ms INTEGER NOT NULL,
        updated_at_unix_ms INTEGER NOT NULL,
        expires_unix_ms INTEGER NOT NULL,
        UNIQUE (tenant, name)
    );

    CREATE TABLE lease_bans (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        agent_uri TEXT NOT NULL,
        banned_at_unix_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, name)
    );

    CREATE TABLE tenant_settings (
        tenant TEXT PRIMARY KEY,
        approval_mode INTEGER NOT NULL,
        max_leases INTEGER NOT NULL
    );
    ",
    // 2: approvals that outlive their lease record (review M7), and the port lease admin gates
    // set by `Leases.SetGate` (NULL: the relay's configured gate).
    r"
    CREATE TABLE lease_approvals (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        approved_at_unix_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, name)
    );

    CREATE TABLE lease_gates (
        relay_id TEXT PRIMARY KEY,
        tcp_enabled INTEGER,
        tcp_max_leases INTEGER,
        udp_enabled INTEGER,
        udp_max_leases INTEGER
    );
    ",
    // 3: idempotent enrollment (review M11: the certificate is stored with the token that
    // issued it, in the same transaction) and relay names (review M10: the DNS names and IPs a
    // relay enrolled with, kept by every renewal).
    r"
    ALTER TABLE enrollment_tokens ADD COLUMN issued_spki_sha256 TEXT;
    ALTER TABLE enrollment_tokens ADD COLUMN issued_cert_pem TEXT;

    CREATE TABLE relay_names (
        uri TEXT PRIMARY KEY,
        names TEXT NOT NULL
    );
    ",
    // 4: a rule's p2p_mode and relay_mode become Go's enums (docs/protocol.md, "Compatibility
    // with Go OutRelay"). Stored text is mapped; an unknown P2P text becomes FORBIDDEN (the
    // choice that never lets bytes leave the relay's audit), an unknown relay mode SPLICE.
    r"
    ALTER TABLE policies ADD COLUMN p2p INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE policies ADD COLUMN relay INTEGER NOT NULL DEFAULT 0;
    UPDATE policies SET
        p2p = CASE lower(p2p_mode)
            WHEN '' THEN 0 WHEN 'allowed' THEN 0 WHEN 'p2p_allowed' THEN 0 WHEN '0' THEN 0
            WHEN 'forbidden' THEN 1 WHEN 'p2p_forbidden' THEN 1 WHEN '1' THEN 1
            WHEN 'required' THEN 2 WHEN 'p2p_required' THEN 2 WHEN '2' THEN 2
            ELSE 1 END,
        relay = CASE lower(relay_mode)
            WHEN 'forward' THEN 1 WHEN 'relay_mode_forward' THEN 1 WHEN '1' THEN 1
            ELSE 0 END;
    ALTER TABLE policies DROP COLUMN p2p_mode;
    ALTER TABLE policies DROP COLUMN relay_mode;
    ALTER TABLE policies RENAME COLUMN p2p TO p2p_mode;
    ALTER TABLE policies RENAME COLUMN relay TO relay_mode;
    ",
    // 5: bandwidth limit records set by `Leases.SetLimit` (issue 21): `name` empty is the
    // tenant's record; rates in bytes per second, 0 = no limit in that direction.
    r"
    CREATE TABLE bandwidth_limits (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        to_service_bytes_per_s INTEGER NOT NULL,
        to_client_bytes_per_s INTEGER NOT NULL,
        PRIMARY KEY (tenant, name)
    );
    ",
];

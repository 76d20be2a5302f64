//! The repository's side of encryption: the few places where plain and encrypted
//! repositories differ (object bodies, object names, volume directories, stored blocks,
//! `config` and key objects), so that the format and repository code call these and
//! never a cipher. The cryptography itself is in [`crate::crypt`].

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;
use snapsync_core::{BlockId, Timestamp};
use snapsync_store::{Result, StoreError};

use crate::backend::{Backend, Put};
use crate::crypt::{new_key_id, sealed_block_len, KdfParams, KeyObject, Keys, Secret, SCHEME};
use crate::format::{self, Compression, Config, Encryption, MAGIC_CONFIG, MAGIC_KEY};
use crate::repo::{decode_block, decode_block_into};
use crate::Repository;

/// One key object as `key list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Its id (`keys/<id>`).
    pub id: String,
    /// `"passphrase"` or `"key-file"`.
    pub kind: String,
    /// When it was added.
    pub created: Timestamp,
    /// Argon2id parameters (passphrases).
    pub kdf: Option<KdfParams>,
    /// Whether it is the key this process opened the repository with.
    pub current: bool,
}

fn key_object_key(id: &str) -> String {
    format!("keys/{id}")
}

/// The bytes of `config`: a version-3 envelope when encrypted, so that a reader
/// without encryption refuses it naming the version instead of misreading it.
pub(crate) fn encode_config(config: &Config) -> Vec<u8> {
    let json = serde_json::to_vec(config).expect("config serialises");
    let version = match config.encryption {
        Some(_) => format::ENCRYPTED_FORMAT_VERSION,
        None => format::FORMAT_VERSION,
    };
    format::encode_envelope_version(MAGIC_CONFIG, version, &json)
}

fn config_fields(config: &Config) -> Vec<u8> {
    serde_json::to_vec(&(
        &config.repository_id,
        config.block_size,
        config.created,
        SCHEME,
    ))
    .expect("serialisable")
}

/// The `encryption` field of a new encrypted repository's config.
pub(crate) fn config_encryption(config: &Config, keys: &Keys) -> Encryption {
    Encryption {
        scheme: SCHEME.into(),
        mac: keys.config_mac(&config_fields(config)),
    }
}

/// Store a new key object wrapping `keys` under `secret`; returns its id.
pub(crate) fn add_key_object(
    backend: &Backend,
    config: &Config,
    keys: &Keys,
    secret: Secret<'_>,
    kdf: KdfParams,
) -> Result<String> {
    let id = new_key_id();
    let object = keys.wrap(secret, kdf, &config.repository_id, &id)?;
    let bytes = format::encode_envelope_version(
        MAGIC_KEY,
        format::ENCRYPTED_FORMAT_VERSION,
        &serde_json::to_vec(&object).expect("serialisable"),
    );
    backend.put(&key_object_key(&id), Bytes::from(bytes), Put::Create)?;
    Ok(id)
}

fn read_key_objects(backend: &Backend) -> Result<Vec<(String, KeyObject)>> {
    let mut out = Vec::new();
    for (key, _) in backend.list("keys")? {
        let Some(id) = key.strip_prefix("keys/") else {
            continue;
        };
        let Some(bytes) = backend.get(&key)? else {
            continue;
        };
        let loc = format!("{}/{key}", backend.location());
        out.push((
            id.to_string(),
            format::decode_json::<KeyObject>(MAGIC_KEY, &bytes, &loc)?,
        ));
    }
    out.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(&b.0)));
    Ok(out)
}

/// The keys of the repository whose `config` is `config` (read from `config_bytes`):
/// `None` for a plain repository; for an encrypted one, the master key unwrapped with
/// `credentials` (and the config's MAC checked), or why not.
pub(crate) fn unlock(
    backend: &Backend,
    config: &Config,
    config_bytes: &[u8],
    credentials: &crate::Credentials,
    loc: &str,
) -> Result<Option<(Keys, String)>> {
    let version = format::envelope_version(config_bytes);
    let Some(enc) = &config.encryption else {
        if version >= format::ENCRYPTED_FORMAT_VERSION {
            return Err(StoreError::corrupt(
                loc,
                "a version-3 config without its encryption field",
            ));
        }
        // Whoever can write the storage could swap an encrypted repository's config
        // for a plain one, and every later write would be stored in clear. Its key
        // objects give it away (one listing per open of a plain repository).
        if !backend.list("keys")?.is_empty() {
            return Err(StoreError::corrupt(
                loc,
                "a plain config in a repository that has key objects (keys/): the config \
                 of an encrypted repository was replaced; nothing is written to it",
            ));
        }
        return Ok(None);
    };
    if enc.scheme != SCHEME {
        return Err(StoreError::Unsupported {
            what: format!(
                "{loc}: encryption scheme {:?} (this snapsync knows {SCHEME:?})",
                enc.scheme
            ),
        });
    }
    if version != format::ENCRYPTED_FORMAT_VERSION {
        return Err(StoreError::corrupt(
            loc,
            "an encrypted config not of version 3",
        ));
    }
    let what = format!("the repository at {}", backend.location());
    if credentials.is_empty() {
        return Err(StoreError::KeyRequired { what });
    }
    let objects = read_key_objects(backend)?;
    let Some((keys, id)) = Keys::unwrap(&objects, credentials, &config.repository_id)? else {
        return Err(StoreError::WrongKey { what });
    };
    if keys.config_mac(&config_fields(config)) != enc.mac {
        return Err(StoreError::corrupt(
            loc,
            "its fields do not match their MAC under the repository's key (changed)",
        ));
    }
    Ok(Some((keys, id)))
}

impl Repository {
    /// True for an encrypted repository (format version 3).
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// The id of the key object this repository was opened (or created) with.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// The format version this repository's new objects are written with.
    pub(crate) fn format_version(&self) -> u32 {
        match self.keys {
            Some(_) => format::ENCRYPTED_FORMAT_VERSION,
            None => format::FORMAT_VERSION,
        }
    }

    /// The directory of `volume` under `volumes/`: its name, or in an encrypted
    /// repository a keyed hash of it.
    pub(crate) fn volume_dir(&self, volume: &str) -> String {
        match &self.keys {
            Some(k) => k.volume_dir(volume),
            None => volume.to_string(),
        }
    }

    /// The id of a manifest or part from its plain encoding: BLAKE3, keyed when
    /// encrypted.
    pub(crate) fn object_id(&self, plain: &[u8]) -> BlockId {
        match &self.keys {
            Some(k) => k.object_id(plain),
            None => BlockId::of(plain),
        }
    }

    /// A pack's id from its plain encoded index.
    pub(crate) fn pack_id(&self, index: &[u8]) -> BlockId {
        match &self.keys {
            Some(k) => k.object_id(&[b"pack\0".as_slice(), index].concat()),
            None => format::pack_id(index),
        }
    }

    /// The bytes to store at `key` for an object whose plain (version-2) encoding is
    /// `plain`: itself, or in an encrypted repository a version-3 envelope of its
    /// payload sealed with its magic and key as associated data.
    pub(crate) fn seal_object(&self, key: &str, plain: Vec<u8>) -> Vec<u8> {
        let Some(k) = &self.keys else { return plain };
        let magic: &[u8; 8] = plain[..8].try_into().expect("an envelope");
        let payload = &plain[format::ENVELOPE_HEADER..plain.len() - format::ENVELOPE_TRAILER];
        let sealed = k.seal(&object_ad(magic, key), payload);
        format::encode_envelope_version(magic, format::ENCRYPTED_FORMAT_VERSION, &sealed)
    }

    /// The plain (version 1 or 2) encoding of the object stored at `key` as `bytes`,
    /// for the format's decoders: `bytes` itself in a plain repository, or opened.
    /// An object of the other kind of repository (plaintext in an encrypted one, or the
    /// reverse) is damage, never read.
    pub(crate) fn open_object<'a>(
        &self,
        magic: &[u8; 8],
        key: &str,
        bytes: &'a [u8],
    ) -> Result<Cow<'a, [u8]>> {
        let loc = self.describe(key);
        let version = (bytes.len() >= format::ENVELOPE_HEADER && &bytes[..8] == magic)
            .then(|| format::envelope_version(bytes));
        let Some(k) = &self.keys else {
            if version == Some(format::ENCRYPTED_FORMAT_VERSION) {
                return Err(StoreError::corrupt(
                    loc,
                    "an encrypted (version 3) object in a plain repository",
                ));
            }
            return Ok(Cow::Borrowed(bytes));
        };
        let payload = format::decode_envelope(magic, bytes, &loc)?;
        if version != Some(format::ENCRYPTED_FORMAT_VERSION) {
            return Err(StoreError::corrupt(
                loc,
                "a plaintext object in an encrypted repository",
            ));
        }
        let plain = k.open(&object_ad(magic, key), payload).ok_or_else(|| {
            StoreError::corrupt(
                loc,
                "does not decrypt (damaged, or another object put in its place)",
            )
        })?;
        Ok(Cow::Owned(format::encode_envelope(magic, &plain)))
    }

    /// A block as stored in a pack: `stored` (compressed or plain), sealed when
    /// encrypted.
    pub(crate) fn seal_stored(&self, id: &BlockId, stored: Bytes) -> Bytes {
        match &self.keys {
            Some(k) => Bytes::from(k.seal_block(id, &stored, self.config.block_size as usize)),
            None => stored,
        }
    }

    /// The largest stored length of a block.
    pub(crate) fn max_stored_len(&self) -> usize {
        let bs = self.config.block_size as usize;
        match self.keys {
            Some(_) => sealed_block_len(bs, bs),
            None => bs,
        }
    }

    /// Decode a stored block of id `id`; `None` when damaged (not checked against its
    /// id here).
    pub(crate) fn decode_stored(
        &self,
        id: &BlockId,
        stored: &[u8],
        compression: Compression,
        raw_len: u32,
    ) -> Option<Vec<u8>> {
        match &self.keys {
            Some(k) => decode_block(&k.open_block(id, stored)?, compression, raw_len),
            None => decode_block(stored, compression, raw_len),
        }
    }

    /// [`Repository::decode_stored`] into `dst`; false when damaged.
    pub(crate) fn decode_stored_into(
        &self,
        id: &BlockId,
        stored: &[u8],
        compression: Compression,
        dst: &mut [u8],
    ) -> bool {
        match &self.keys {
            Some(k) => k
                .open_block(id, stored)
                .is_some_and(|s| decode_block_into(&s, compression, dst)),
            None => decode_block_into(stored, compression, dst),
        }
    }

    fn keys_or_refuse(&self) -> Result<&Keys> {
        self.keys.as_ref().ok_or_else(|| StoreError::Unsupported {
            what: format!("{} is not encrypted: it has no keys", self.location()),
        })
    }

    /// Add a key object wrapping this repository's master key under the first secret
    /// of `credentials` (Argon2id with `kdf` for a passphrase); returns its id. Data is
    /// not touched: every key opens the same master key.
    pub fn add_key(&self, credentials: &crate::Credentials, kdf: KdfParams) -> Result<String> {
        let keys = self.keys_or_refuse()?;
        let secret = credentials
            .first()
            .ok_or_else(|| StoreError::invalid_argument("no new passphrase or key file given"))?;
        add_key_object(&self.backend, &self.config, keys, secret, kdf)
    }

    /// The key objects, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        self.keys_or_refuse()?;
        Ok(read_key_objects(&self.backend)?
            .into_iter()
            .map(|(id, o)| KeyInfo {
                current: self.key_id.as_deref() == Some(id.as_str()),
                id,
                kind: o.kind,
                created: o.created,
                kdf: o.kdf,
            })
            .collect())
    }

    /// Remove key object `id`; the last one is refused (it would lock everyone out).
    pub fn remove_key(&self, id: &str) -> Result<()> {
        self.keys_or_refuse()?;
        let objects = read_key_objects(&self.backend)?;
        if !objects.iter().any(|(k, _)| k == id) {
            return Err(StoreError::not_found(format!(
                "key {id:?} in {}",
                self.location()
            )));
        }
        if objects.len() < 2 {
            return Err(StoreError::invalid_argument(format!(
                "key {id:?} is the last key of {}: removing it would leave nothing that opens it",
                self.location()
            )));
        }
        self.backend.delete(&key_object_key(id))
    }
}

/// Associated data of a sealed object: its magic and object key.
fn object_ad(magic: &[u8; 8], key: &str) -> Vec<u8> {
    [magic.as_slice(), key.as_bytes()].concat()
}

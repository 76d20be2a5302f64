//! Client-side encryption of a repository (format version 3). All of the cryptography
//! is here: the rest of the crate calls [`Keys::seal`], [`Keys::open`] and the keyed
//! hashes, and never sees a cipher. `docs/FORMAT.md` ("Encrypted repositories") is the
//! prose version; the two must agree.
//!
//! - A random 64-byte **master key** per repository, stored only wrapped: once per
//!   passphrase (or key file) in a `keys/<id>` object, under a key derived from the
//!   passphrase with Argon2id (its parameters and salt stored beside it), so a
//!   passphrase can be added, removed or rotated without touching any data.
//! - Subkeys from the master key with BLAKE3 `derive_key`: one seals object bodies and
//!   blocks, one names objects (keyed hashes instead of content hashes in object keys),
//!   one hides volume names in object keys.
//! - XChaCha20-Poly1305 with a random 24-byte nonce per sealed unit: with 192-bit nonces
//!   a collision is negligible however many uncoordinated writers seal with one key, so
//!   writers need no counter or coordination. Computed as its definition says (see
//!   [`xchacha`]) on `ring`'s ChaCha20-Poly1305, which seals 1.7x as fast on this code's
//!   machines as the RustCrypto crate; the tests check the bytes against that crate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use snapsync_core::{BlockId, Timestamp};
use snapsync_store::{Result, StoreError};
use zeroize::{Zeroize, Zeroizing};

/// The scheme an encrypted repository's `config` names.
pub const SCHEME: &str = "xchacha20poly1305-blake3-argon2id";
/// Random nonce in front of every sealed unit.
pub const NONCE_LEN: usize = 24;
/// Poly1305 tag after every sealed unit.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed unit adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// A sealed block's plaintext starts with the stored length (`u32`), then the stored
/// bytes, then zero padding.
pub const BLOCK_LEN_PREFIX: usize = 4;
/// Length of the master key.
const MASTER_LEN: usize = 64;

const DATA_KEY_CONTEXT: &str = "snapsync 2026-12-05 data key v1";
const ID_KEY_CONTEXT: &str = "snapsync 2026-12-05 object id key v1";
const NAME_KEY_CONTEXT: &str = "snapsync 2026-12-05 volume name key v1";
const CONFIG_MAC_CONTEXT: &str = "snapsync 2026-12-05 config mac key v1";
const KEY_FILE_CONTEXT: &str = "snapsync 2026-12-05 key file wrapping key v1";
/// Associated data of a wrapped master key, before the repository id and key id.
const WRAP_AD: &[u8] = b"snapsync key object v1";

/// Argon2id parameters of one key object (stored in it, so each passphrase keeps the
/// cost it was added with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB (at least 8).
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 4 lanes: exactly RFC 9106's second recommended option. The
    /// lanes are computed on up to four threads (the `argon2` crate's `parallel`
    /// feature), so opening waits for about a quarter of the derivation's CPU time on
    /// four cores and half on two, while a guess still costs an attacker the same
    /// memory and the same total work as with one lane (Argon2 fills m blocks t times
    /// whatever the lanes). Keys created with one lane (before session 11) keep it.
    fn default() -> Self {
        Self {
            memory_kib: 64 << 10,
            iterations: 3,
            parallelism: 4,
        }
    }
}

/// What may open an encrypted repository: passphrases and key files, each tried
/// against every key object (so one set opens both ends of a replication between two
/// encrypted repositories). Secrets are zeroized when dropped and never printed.
#[derive(Clone, Default)]
pub struct Credentials {
    passphrases: Vec<Zeroizing<Vec<u8>>>,
    key_files: Vec<Zeroizing<Vec<u8>>>,
    memo: Option<WrappingKeyMemo>,
}

/// Wrapping keys derived in this process, kept so that later opens of the same key
/// objects with the same secrets skip Argon2id.
///
/// A daemon opens each destination again for every run; without this, each run of an
/// unattended job paid one key derivation per encrypted repository (~0.1 s of both
/// cores and 64 MiB) before doing anything. What is kept is the key that *wraps* a
/// master key, looked up by a keyed BLAKE3 hash of the secret, its kind, the key
/// object's Argon2id parameters and its salt (the hash key random per memo, so the
/// lookup keys say nothing about the secrets); the master key is still unwrapped and
/// authenticated from the key object read at each open. So a removed key object opens
/// nothing, a rotated passphrase (a new key object, a new salt) is derived afresh, and a
/// changed password file is a different secret. Kept keys are wiped when the memo is
/// dropped. Opt-in ([`Credentials::remembering`]): a one-shot command gains nothing.
#[derive(Clone)]
pub struct WrappingKeyMemo {
    inner: Arc<MemoInner>,
}

/// Wrapping keys by lookup key.
type KeptKeys = HashMap<[u8; 32], Zeroizing<[u8; 32]>>;

struct MemoInner {
    hash_key: Zeroizing<[u8; 32]>,
    /// Keys derived through this memo (lookups that found nothing).
    derived: AtomicU64,
    keys: Mutex<KeptKeys>,
}

impl WrappingKeyMemo {
    /// An empty memo.
    pub fn new() -> Self {
        let mut hash_key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut hash_key[..]);
        Self {
            inner: Arc::new(MemoInner {
                hash_key,
                derived: Default::default(),
                keys: Default::default(),
            }),
        }
    }

    /// Wrapping keys derived through this memo so far: one per secret and key object
    /// tried, however often it is opened.
    pub fn derived(&self) -> u64 {
        self.inner.derived.load(Ordering::Relaxed)
    }

    /// Wrapping keys kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no key is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, KeptKeys> {
        // A panic elsewhere cannot leave the map half-updated: inserts are single calls.
        self.inner
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup_key(&self, secret: Secret<'_>, kdf: Option<KdfParams>, salt: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.inner.hash_key);
        let bytes = match secret {
            Secret::Passphrase(p) | Secret::KeyFile(p) => p,
        };
        for part in [secret.kind().as_bytes(), bytes, salt] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        if let Some(k) = kdf {
            for n in [k.memory_kib, k.iterations, k.parallelism] {
                h.update(&n.to_le_bytes());
            }
        }
        *h.finalize().as_bytes()
    }
}

impl Default for WrappingKeyMemo {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for WrappingKeyMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappingKeyMemo({} kept)", self.len())
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials({} passphrase(s), {} key file(s){})",
            self.passphrases.len(),
            self.key_files.len(),
            if self.memo.is_some() {
                ", remembering"
            } else {
                ""
            }
        )
    }
}

impl Credentials {
    /// Add a passphrase.
    pub fn with_passphrase(mut self, passphrase: impl Into<Vec<u8>>) -> Self {
        self.passphrases.push(Zeroizing::new(passphrase.into()));
        self
    }

    /// Add the contents of a key file (random bytes, at least 32 of them).
    pub fn with_key_file(mut self, contents: impl Into<Vec<u8>>) -> Self {
        self.key_files.push(Zeroizing::new(contents.into()));
        self
    }

    /// Keep the wrapping keys derived with these credentials in `memo`, and use those
    /// it already holds (see [`WrappingKeyMemo`]).
    pub fn remembering(mut self, memo: WrappingKeyMemo) -> Self {
        self.memo = Some(memo);
        self
    }

    /// The wrapping key of key object `key_id` (`kdf`, `salt`) for `secret`: from the
    /// memo, or derived (and kept there).
    fn wrapping_key(
        &self,
        secret: Secret<'_>,
        kdf: Option<KdfParams>,
        salt: &[u8],
        key_id: &str,
    ) -> Result<Zeroizing<[u8; 32]>> {
        let Some(memo) = &self.memo else {
            return derive_wrapping_key(secret, kdf, salt);
        };
        let lookup = memo.lookup_key(secret, kdf, salt);
        if let Some(k) = memo.lock().get(&lookup) {
            return Ok(k.clone());
        }
        let derived = derive_wrapping_key(secret, kdf, salt)?;
        memo.lock().insert(lookup, derived.clone());
        memo.inner.derived.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            key = key_id,
            "derived the wrapping key of keys/{key_id} ({}), kept for this process's later opens",
            secret.kind()
        );
        Ok(derived)
    }

    /// True when there is nothing to try.
    pub fn is_empty(&self) -> bool {
        self.passphrases.is_empty() && self.key_files.is_empty()
    }

    /// The first secret given: what `init` wraps the new master key with.
    pub(crate) fn first(&self) -> Option<Secret<'_>> {
        self.passphrases
            .first()
            .map(|p| Secret::Passphrase(p))
            .or_else(|| self.key_files.first().map(|k| Secret::KeyFile(k)))
    }

    fn all(&self) -> impl Iterator<Item = Secret<'_>> {
        self.passphrases
            .iter()
            .map(|p| Secret::Passphrase(p))
            .chain(self.key_files.iter().map(|k| Secret::KeyFile(k)))
    }
}

/// One passphrase or key file.
#[derive(Clone, Copy)]
pub(crate) enum Secret<'a> {
    Passphrase(&'a [u8]),
    KeyFile(&'a [u8]),
}

impl Secret<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Secret::Passphrase(_) => KIND_PASSPHRASE,
            Secret::KeyFile(_) => KIND_KEY_FILE,
        }
    }
}

const KIND_PASSPHRASE: &str = "passphrase";
const KIND_KEY_FILE: &str = "key-file";

/// A `keys/<id>` object: the master key wrapped under one passphrase or key file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyObject {
    /// `"passphrase"` (Argon2id) or `"key-file"` (BLAKE3 of the file, no stretching:
    /// a key file holds random bytes).
    pub kind: String,
    /// Argon2id parameters (passphrases only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// Random salt, hex.
    pub salt: String,
    /// When it was added.
    pub created: Timestamp,
    /// Nonce of the wrapped master key, hex.
    pub nonce: String,
    /// The master key sealed with XChaCha20-Poly1305 under the derived key, hex.
    pub master_key: String,
}

/// The keys of an open encrypted repository; zeroized when dropped.
pub(crate) struct Keys {
    master: Zeroizing<[u8; MASTER_LEN]>,
    data: Zeroizing<[u8; 32]>,
    id: Zeroizing<[u8; 32]>,
    name: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Keys {
    /// A new random master key.
    pub(crate) fn generate() -> Self {
        Self::from_master(Zeroizing::new(random()))
    }

    fn from_master(master: Zeroizing<[u8; MASTER_LEN]>) -> Self {
        let derive = |context| Zeroizing::new(blake3::derive_key(context, &master[..]));
        Self {
            data: derive(DATA_KEY_CONTEXT),
            id: derive(ID_KEY_CONTEXT),
            name: derive(NAME_KEY_CONTEXT),
            master,
        }
    }

    /// Seal `plaintext`: `nonce ‖ ciphertext ‖ tag`, bound to `ad`.
    pub(crate) fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.data, ad, SEAL_OVERHEAD + plaintext.len(), |b| {
            b.extend_from_slice(plaintext)
        })
    }

    /// Open what [`Keys::seal`] sealed with the same `ad`; `None` when it was damaged,
    /// swapped for another object, or sealed with another key.
    pub(crate) fn open(&self, ad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        open_with(&self.data, ad, sealed)
    }

    /// The name of a content-derived object (pack, manifest, part): BLAKE3 keyed with
    /// the id key, so a name says nothing to whoever has no key (an unkeyed hash of
    /// known content could be recomputed to confirm it is stored).
    pub(crate) fn object_id(&self, content: &[u8]) -> BlockId {
        BlockId(*blake3::keyed_hash(&self.id, content).as_bytes())
    }

    /// The directory of a volume under `volumes/`: 32 hex digits of a keyed hash of its
    /// name (the name itself is only inside the sealed catalogs).
    pub(crate) fn volume_dir(&self, volume: &str) -> String {
        hex(&blake3::keyed_hash(&self.name, volume.as_bytes()).as_bytes()[..16])
    }

    /// Authenticate the clear fields of `config` (so a changed block size or a config
    /// copied from another repository is noticed once a key opens).
    pub(crate) fn config_mac(&self, fields: &[u8]) -> String {
        let key = blake3::derive_key(CONFIG_MAC_CONTEXT, &self.master[..]);
        let key = Zeroizing::new(key);
        hex(blake3::keyed_hash(&key, fields).as_bytes())
    }

    /// Wrap the master key under `secret` for the key object `key_id` of repository
    /// `repository_id`.
    pub(crate) fn wrap(
        &self,
        secret: Secret<'_>,
        kdf: KdfParams,
        repository_id: &str,
        key_id: &str,
    ) -> Result<KeyObject> {
        let salt: [u8; 32] = random();
        let kdf = matches!(secret, Secret::Passphrase(_)).then_some(kdf);
        let wrapping = derive_wrapping_key(secret, kdf, &salt)?;
        let sealed = seal_with(
            &wrapping,
            &wrap_ad(repository_id, key_id),
            SEAL_OVERHEAD + MASTER_LEN,
            |b| b.extend_from_slice(&self.master[..]),
        );
        Ok(KeyObject {
            kind: secret.kind().into(),
            kdf,
            salt: hex(&salt),
            created: Timestamp::from_system_time(std::time::SystemTime::now()),
            nonce: hex(&sealed[..NONCE_LEN]),
            master_key: hex(&sealed[NONCE_LEN..]),
        })
    }

    /// Unwrap the master key from the first key object any of `credentials` opens;
    /// returns it with the id of that key object. `None`: none does.
    pub(crate) fn unwrap(
        objects: &[(String, KeyObject)],
        credentials: &Credentials,
        repository_id: &str,
    ) -> Result<Option<(Self, String)>> {
        for secret in credentials.all() {
            for (key_id, object) in objects {
                if object.kind != secret.kind() {
                    continue;
                }
                let bad = |what: &str| {
                    StoreError::corrupt(format!("keys/{key_id}"), format!("bad {what}"))
                };
                let salt = unhex(&object.salt).ok_or_else(|| bad("salt"))?;
                let mut sealed = unhex(&object.nonce).ok_or_else(|| bad("nonce"))?;
                sealed.extend(unhex(&object.master_key).ok_or_else(|| bad("master key"))?);
                let wrapping = credentials.wrapping_key(secret, object.kdf, &salt, key_id)?;
                let Some(master) = open_with(&wrapping, &wrap_ad(repository_id, key_id), &sealed)
                else {
                    continue;
                };
                let master: [u8; MASTER_LEN] = master[..]
                    .try_into()
                    .map_err(|_| bad("master key length"))?;
                return Ok(Some((
                    Self::from_master(Zeroizing::new(master)),
                    key_id.clone(),
                )));
            }
        }
        Ok(None)
    }
}

fn wrap_ad(repository_id: &str, key_id: &str) -> Vec<u8> {
    [
        WRAP_AD,
        b"\0",
        repository_id.as_bytes(),
        b"\0",
        key_id.as_bytes(),
    ]
    .concat()
}

/// The key that wraps the master key: Argon2id of a passphrase, or a BLAKE3
/// derive-key of a key file's bytes (which must be random: at least 32 bytes).
fn derive_wrapping_key(
    secret: Secret<'_>,
    kdf: Option<KdfParams>,
    salt: &[u8],
) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    match secret {
        Secret::Passphrase(p) => {
            let kdf = kdf.ok_or_else(|| {
                StoreError::corrupt("key object", "a passphrase key without Argon2id parameters")
            })?;
            let params =
                argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
                    .map_err(|e| {
                        StoreError::invalid_argument(format!("Argon2id parameters: {e}"))
                    })?;
            let mut memory = KdfMemory::new(params.block_count());
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into_with_memory(p, salt, &mut out[..], &mut memory.0[..])
                .map_err(|e| StoreError::invalid_argument(format!("Argon2id: {e}")))?;
        }
        Secret::KeyFile(k) => {
            if k.len() < 32 {
                return Err(StoreError::invalid_argument(format!(
                    "a key file must hold at least 32 random bytes (it holds {})",
                    k.len()
                )));
            }
            let mut h = blake3::Hasher::new_derive_key(KEY_FILE_CONTEXT);
            h.update(salt);
            h.update(k);
            *out = *h.finalize().as_bytes();
        }
    }
    Ok(out)
}

/// Argon2id's working memory (64 MiB with the default parameters), ours rather than
/// the `argon2` crate's for two reasons:
///
/// - **Wiped.** The crate frees its memory without wiping it, and the last block of
///   each lane, XORed and hashed, *is* the wrapping key: left in freed pages it would
///   outlive the `Zeroizing` copy. Dropping this wipes every block.
/// - **Huge pages.** Every command on an encrypted repository derives a key first, in a
///   fresh process, so the 16 K page faults that first touch 64 MiB of 4 KiB pages are
///   paid each time: measured, they were a third of the derivation's 0.15 s (more on a
///   VM whose freed memory goes back to the host). Asked for transparent huge pages
///   (`MADV_HUGEPAGE`, honoured where THP is `always` or `madvise`), the same memory is
///   ~32 faults of 2 MiB: the derivation took 0.09–0.11 s instead of 0.14–0.15 s.
struct KdfMemory(Vec<argon2::Block>);

impl KdfMemory {
    fn new(blocks: usize) -> Self {
        let mut memory = Vec::with_capacity(blocks);
        advise_huge_pages(memory.spare_capacity_mut());
        memory.resize(blocks, argon2::Block::default());
        Self(memory)
    }
}

impl Drop for KdfMemory {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Ask the kernel to back the 2 MiB-aligned part of `memory` (not yet touched) with
/// transparent huge pages. Only a hint: refused or unsupported, nothing changes.
fn advise_huge_pages<T>(memory: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let start = memory.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(memory);
        let (first, last) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        if last > first {
            #[allow(unsafe_code)]
            // SAFETY: `[first, last)` lies inside `memory`, an allocation this function
            // borrows mutably, and MADV_HUGEPAGE neither reads nor writes it nor changes
            // its contents or validity: it only tells the kernel how to back it.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = memory;
}

/// Seal one unit: `nonce ‖ ciphertext ‖ tag`, the plaintext being what `fill` appends
/// to the buffer (which already holds the nonce; `capacity` bytes reserved in all).
fn seal_with(
    key: &[u8; 32],
    ad: &[u8],
    capacity: usize,
    fill: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let nonce: [u8; NONCE_LEN] = random();
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(&nonce);
    fill(&mut out);
    let tag = xchacha::seal_in_place(key, &nonce, ad, &mut out[NONCE_LEN..]);
    out.extend_from_slice(&tag);
    out
}

fn open_with(key: &[u8; 32], ad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut plain = Zeroizing::new(body.to_vec());
    xchacha::open_in_place(key, nonce.try_into().ok()?, ad, &mut plain, tag).then_some(plain)
}

/// XChaCha20-Poly1305 as draft-irtf-cfrg-xchacha-03 defines it (and libsodium and
/// RustCrypto's `chacha20poly1305::XChaCha20Poly1305` compute it): HChaCha20 of the key
/// and the nonce's first 16 bytes is a subkey for the IETF ChaCha20-Poly1305 of RFC
/// 8439, whose 12-byte nonce is four zero bytes and the nonce's last 8.
///
/// The subkey is zeroized here; `ring` keeps its own copy of it, unzeroized, until the
/// call ends. A subkey opens only the one unit sealed under its nonce.
mod xchacha {
    use super::{NONCE_LEN, TAG_LEN};
    use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
    use zeroize::Zeroizing;

    fn subkey(key: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
        let mut sub = Zeroizing::new([0u8; 32]);
        let derived =
            chacha20::hchacha::<chacha20::cipher::consts::U10>(key.into(), nonce[..16].into());
        sub.copy_from_slice(&derived);
        let key = UnboundKey::new(&CHACHA20_POLY1305, &sub[..])
            .expect("ChaCha20-Poly1305 takes a 32-byte key");
        let mut ietf = [0u8; 12];
        ietf[4..].copy_from_slice(&nonce[16..]);
        (LessSafeKey::new(key), Nonce::assume_unique_for_key(ietf))
    }

    /// Encrypt `buf` in place; the tag.
    pub(super) fn seal_in_place(
        key: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        ad: &[u8],
        buf: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let (key, nonce) = subkey(key, nonce);
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(ad), buf)
            .expect("ChaCha20-Poly1305 seals any length a repository object has");
        tag.as_ref().try_into().expect("a 16-byte tag")
    }

    /// Decrypt `buf` in place if `tag` authenticates it with `ad`; `false` (and `buf`
    /// unspecified) otherwise.
    pub(super) fn open_in_place(
        key: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        ad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> bool {
        let Ok(tag) = <[u8; TAG_LEN]>::try_from(tag) else {
            return false;
        };
        let (key, nonce) = subkey(key, nonce);
        key.open_in_place_separate_tag(nonce, Aad::from(ad), Tag::from(tag), buf, 0..)
            .is_ok()
    }
}

/// Padmé (Nikitin et al., "Reducing metadata leakage from encrypted files and
/// communication with PURBs", 2019): round `len` up so that only its top
/// `⌊log2 ⌊log2 len⌋⌋ + 1` bits may be set. Leaks O(log log len) bits of a length for at
/// most 12 % overhead (about 3 % at 64 KiB).
pub(crate) fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let e = 63 - u64::from(len.leading_zeros());
    let s = 64 - u64::from(e.leading_zeros());
    let mask = (1u64 << (e - s)) - 1;
    (len + mask) & !mask
}

/// The stored length of a sealed block whose stored (compressed or plain) bytes are
/// `stored` long, in a repository of `block_size` blocks: Padmé-padded, but never more
/// than a sealed uncompressed block (all of which have that one length anyway).
pub(crate) fn sealed_block_len(stored: usize, block_size: usize) -> usize {
    let unit = |n: usize| n + BLOCK_LEN_PREFIX + SEAL_OVERHEAD;
    (padme(unit(stored) as u64) as usize).min(unit(block_size).max(unit(stored)))
}

/// Associated data of a sealed block: the pack magic and the block's id, so a block
/// opens only as itself, wherever it is moved (gc copies sealed blocks unchanged).
pub(crate) fn block_ad(id: &BlockId) -> [u8; 40] {
    let mut ad = [0u8; 40];
    ad[..8].copy_from_slice(crate::format::MAGIC_PACK);
    ad[8..].copy_from_slice(id.as_bytes());
    ad
}

impl Keys {
    /// Seal one stored block (`stored`: its compressed or plain bytes) for a pack, in
    /// one buffer and one pass: blocks are most of what is sealed. (Block data is not
    /// key material: these buffers are not zeroized.)
    pub(crate) fn seal_block(&self, id: &BlockId, stored: &[u8], block_size: usize) -> Vec<u8> {
        let total = sealed_block_len(stored.len(), block_size);
        seal_with(&self.data, &block_ad(id), total, |buf| {
            buf.extend_from_slice(&(stored.len() as u32).to_le_bytes());
            buf.extend_from_slice(stored);
            buf.resize(total - TAG_LEN, 0);
        })
    }

    /// Open a sealed block: its stored bytes, or `None` when damaged or not this block.
    pub(crate) fn open_block(&self, id: &BlockId, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD + BLOCK_LEN_PREFIX {
            return None;
        }
        let mut plain = std::mem::take(&mut *open_with(&self.data, &block_ad(id), sealed)?);
        let len = u32::from_le_bytes(plain[..4].try_into().ok()?) as usize;
        if len > plain.len() - 4 {
            return None;
        }
        plain.copy_within(4..4 + len, 0);
        plain.truncate(len);
        Some(plain)
    }
}

/// The nonce of a stored key object (for verify's audit of nonces); `None` when it
/// cannot be parsed.
pub(crate) fn key_object_nonce(bytes: &[u8]) -> Option<Vec<u8>> {
    let p = crate::format::decode_envelope(crate::format::MAGIC_KEY, bytes, "key").ok()?;
    let o: KeyObject = serde_json::from_slice(p).ok()?;
    unhex(&o.nonce).filter(|n| n.len() == NONCE_LEN)
}

/// A new key object id: 32 random hex digits.
pub(crate) fn new_key_id() -> String {
    hex(&random::<16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KdfParams {
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn xchacha_is_the_reference_xchacha20poly1305() {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000, 65536 + 7] {
            let key: [u8; 32] = random();
            let nonce: [u8; NONCE_LEN] = random();
            let ad: [u8; 40] = random();
            let mut plain = vec![0u8; len];
            rand::rng().fill_bytes(&mut plain);
            let reference = XChaCha20Poly1305::new((&key).into());
            let mut theirs = plain.clone();
            let their_tag = reference
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &ad, &mut theirs)
                .unwrap();
            let mut ours = plain.clone();
            let our_tag = xchacha::seal_in_place(&key, &nonce, &ad, &mut ours);
            assert_eq!(ours, theirs, "ciphertext of {len} bytes");
            assert_eq!(our_tag[..], their_tag[..], "tag of {len} bytes");
            // What the reference sealed opens here, and only as it was sealed.
            let opens = |mut buf: Vec<u8>, ad: &[u8], tag: &[u8]| {
                xchacha::open_in_place(&key, &nonce, ad, &mut buf, tag).then_some(buf)
            };
            assert_eq!(opens(theirs.clone(), &ad, &their_tag), Some(plain));
            if len > 0 {
                let mut flipped = theirs.clone();
                flipped[len / 2] ^= 1;
                assert_eq!(opens(flipped, &ad, &their_tag), None);
            }
            assert_eq!(opens(theirs.clone(), b"other", &their_tag), None);
            assert_eq!(opens(theirs, &ad, &their_tag[..15]), None);
        }
    }

    #[test]
    fn seal_open_and_associated_data() {
        let k = Keys::generate();
        let s = k.seal(b"a", b"hello");
        assert_eq!(&k.open(b"a", &s).unwrap()[..], b"hello");
        assert!(k.open(b"b", &s).is_none(), "other associated data");
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 1;
            assert!(k.open(b"a", &bad).is_none(), "flip at {i}");
        }
        assert!(Keys::generate().open(b"a", &s).is_none(), "other key");
        assert_ne!(k.seal(b"a", b"hello"), s, "random nonce");
    }

    #[test]
    fn blocks_pad_and_open() {
        let k = Keys::generate();
        let id = BlockId::of(b"x");
        for n in [0usize, 1, 100, 1000, 30_000, 65_536] {
            let data = vec![7u8; n];
            let s = k.seal_block(&id, &data, 65_536);
            assert_eq!(s.len(), sealed_block_len(n, 65_536));
            assert!(s.len() <= 65_536 + 44);
            assert_eq!(&k.open_block(&id, &s).unwrap()[..], &data[..]);
            assert!(k.open_block(&BlockId::of(b"y"), &s).is_none());
        }
        // Lengths in one bucket look alike.
        assert_eq!(
            sealed_block_len(20_000, 65_536),
            sealed_block_len(20_300, 65_536)
        );
    }

    #[test]
    fn padme_overhead() {
        for l in 2..200_000u64 {
            let p = padme(l);
            assert!(p >= l && (p - l) * 100 <= l * 12, "{l} -> {p}");
        }
        assert_eq!(padme(65_580), 67_584);
    }

    #[test]
    fn wrap_unwrap() {
        let k = Keys::generate();
        let pass = Credentials::default().with_passphrase("secret");
        let o = k
            .wrap(pass.first().unwrap(), cheap(), "repo", "key1")
            .unwrap();
        let objects = vec![("key1".to_string(), o.clone())];
        let (back, id) = Keys::unwrap(&objects, &pass, "repo").unwrap().unwrap();
        assert_eq!(id, "key1");
        assert_eq!(back.volume_dir("vm"), k.volume_dir("vm"));
        let wrong = Credentials::default().with_passphrase("wrong");
        assert!(Keys::unwrap(&objects, &wrong, "repo").unwrap().is_none());
        assert!(Keys::unwrap(&objects, &pass, "other").unwrap().is_none());
        let moved = vec![("key2".to_string(), o)];
        assert!(Keys::unwrap(&moved, &pass, "repo").unwrap().is_none());
        let file = Credentials::default().with_key_file(vec![1u8; 32]);
        let o = k.wrap(file.first().unwrap(), cheap(), "repo", "f").unwrap();
        assert!(o.kdf.is_none());
        let objects = vec![("f".to_string(), o)];
        assert!(Keys::unwrap(&objects, &file, "repo").unwrap().is_some());
        assert!(Keys::unwrap(&objects, &pass, "repo").unwrap().is_none());
    }
}

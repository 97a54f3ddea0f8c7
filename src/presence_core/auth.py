"""Who a client is (a verified JWT) and what it may do on a private channel (a policy).

`JwtVerifier` checks a client's token the way Supabase Realtime does: HS256/384/512 with the
project's secret, RS*/PS*/ES*/EdDSA with the keys of a JWKS, ``exp`` and ``role`` required, and a
refusal worded as Realtime words it (`presence_core.errors.TokenError.reason`).  It reads no clock:
the caller passes ``now``, so expiry is the core's timer and tests run on virtual time.

Security rules it keeps, each against a known attack on JWT libraries:

* The algorithms are an allow-list fixed by the configuration, never read from the token (RFC 8725
  §2.1).  A token whose header names an HS* algorithm is checked against the secret only, one
  naming an asymmetric algorithm against one JWKS key only, and each key only with the
  algorithms of its own family and curve.  So an HS256 token "signed" with an RSA public key's PEM
  (the classic algorithm confusion) and ``alg: none`` both fail.
* Symmetric keys never come from a JWKS (a JWKS is public material): the secret is its own
  argument.
* Nothing the client sent (a header, a claim value, the token) goes into a refusal's reason, and
  no key material goes into a configuration error: PyJWT puts the whole JWK in the text of its
  key errors, so those are never chained or quoted.
* A token longer than `MAX_TOKEN_LENGTH` is refused before it is parsed.

`Access` is what a `presence_core.typing.Policy` grants on one topic; `load_policy` finds a
policy from a ``"package.module:callable"`` string (a command-line option).
"""

from __future__ import annotations

import hmac
import importlib
import json
import logging
import os
import re
import warnings
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import jwt
from jwt.algorithms import get_default_algorithms

from ._validate import check_finite, check_time, is_number, type_name
from .errors import PresenceTypeError, PresenceValueError, TokenError

if TYPE_CHECKING:
    from jwt.types import Options

    from .typing import Policy

__all__ = [
    "MAX_TOKEN_LENGTH",
    "Access",
    "JwtVerifier",
    "Verified",
    "load_policy",
]

logger = logging.getLogger("presence_core.auth")

MAX_TOKEN_LENGTH: Final = 16 * 1024
"""Tokens longer than this many characters are refused unparsed (Supabase's are under 2 KiB)."""

# The reasons sent to a client, in Supabase Realtime's words where it has them.
REASON_SIGNATURE: Final = "Failed to validate JWT signature"
REASON_MALFORMED: Final = "MalformedJWT: The token provided is not a valid JWT"
REASON_TOO_LONG: Final = f"MalformedJWT: The token is longer than {MAX_TOKEN_LENGTH} characters"
REASON_NOT_YET_VALID: Final = "InvalidJWTToken: Token is not valid yet"
REASON_BAD_EXP: Final = "InvalidJWTToken: Token expiration time is invalid"
REASON_AUDIENCE: Final = "InvalidJWTToken: Invalid audience"
REASON_ISSUER: Final = "InvalidJWTToken: Invalid issuer"
REASON_INVALID: Final = "InvalidJWTToken: Invalid token"
_REASON_DEFAULT_FIELDS: Final = "Fields `role` and `exp` are required in JWT"

_HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_HMAC_DIGESTS: Final = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
_PLAIN_HEADER: Final = frozenset({"alg", "typ", "kid"})  # what the HS* fast path reads
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES: Final = frozenset({"Ed25519", "Ed448"})

# The key family ("kty") each accepted asymmetric algorithm needs.
_FAMILY: Final[Mapping[str, str]] = {
    **dict.fromkeys(_RSA_ALGORITHMS, "RSA"),
    **dict.fromkeys(_EC_ALGORITHMS.values(), "EC"),
    "EdDSA": "OKP",
}

# PyJWT (2.13 and later) warns on every verification with a key shorter than its algorithm
# recommends (an HMAC secret under the hash size, an RSA key under 2048 bits).  The key is the
# operator's choice, made once; a warning per token would flood the logs (or, under
# ``-W error``, refuse every token).  The verifier learns at construction which keys are short
# and silences that one warning around their verifications only.
_SHORT_KEY_WARNING: Final[type[Warning] | None] = getattr(jwt, "InsecureKeyLengthWarning", None)


@dataclass(frozen=True, slots=True)
class Verified:
    """A token that verified, and its claims.

    Attributes:
        token: The token itself, to compare with a later refresh.  It is a bearer credential:
            it never appears in the repr, so logging a `Verified` does not leak it.
        claims: The verified claims (a read-only view).
        expires_at: The ``exp`` claim, in unix seconds: the moment the server must re-check the
            connection.
    """

    token: str = field(repr=False)
    claims: Mapping[str, Any]
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Key:
    # One JWKS key, loaded once: ``key`` is the cryptography public key object, ``algorithms``
    # what it may verify, ``short`` whether PyJWT would warn about its size.
    key: Any
    family: str
    algorithms: frozenset[str]
    short: bool


class JwtVerifier:
    """Verifies clients' JWTs against a secret (HS*), a JWKS (RS*, PS*, ES*, EdDSA), or both.

    Build one per configuration and share it: the keys are loaded once, and `verify` only
    parses the token and checks one signature.  `verify` changes no state, so threads may share
    a verifier, with one exception: with a key PyJWT finds short, each verification silences
    PyJWT's warning with `warnings.catch_warnings`, which is not thread-safe (it swaps the
    process-wide filters).  Use a full-length secret (32 bytes for HS256, 64 for HS512) or
    keep such a verifier on one thread, as the server's event loop does.

    Args:
        secret: The HMAC secret (Supabase's "JWT secret"), as text (used as its UTF-8 bytes, as
            Supabase does) or bytes.  Tokens whose header says HS256, HS384 or HS512 are
            checked against it and nothing else.
        jwks: A JSON Web Key Set (``{"keys": [...]}``, as served at
            ``/auth/v1/.well-known/jwks.json``) of asymmetric public keys.  A token naming an
            asymmetric algorithm is checked against the key its header ``kid`` names, or, without
            a ``kid``, against the set's only key of that family.  An empty set is allowed next
            to a secret (Supabase serves one for projects without asymmetric keys).
        audience: When given, the ``aud`` claim must contain it (or one of them).  When not,
            ``aud`` is not checked at all (Supabase user tokens carry ``aud: "authenticated"``).
        issuer: When given, the ``iss`` claim must equal it.
        leeway: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        required: Claims that must be present and not null.  Must include ``"exp"``: a token
            without an expiry would be a credential that never ends.

    Raises:
        PresenceValueError: Neither a secret nor a JWKS; a secret that is empty or looks like an
            asymmetric key; a JWKS that is not ``{"keys": [...]}``, holds a key that cannot be
            loaded, a symmetric (``oct``) key, a key with an algorithm or curve outside the
            allow-list, or two keys with the same ``kid``.  The message names the key's index,
            never its material.
        PresenceTypeError: An argument of the wrong type.
    """

    __slots__ = (
        "_audience",
        "_by_kid",
        "_fast_hmac",
        "_fields_reason",
        "_issuer",
        "_leeway",
        "_options",
        "_required",
        "_secret",
        "_short_secret",
        "_sole",
    )

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        jwks: Mapping[str, Any] | None = None,
        audience: str | Sequence[str] | None = None,
        issuer: str | None = None,
        leeway: float = 5.0,
        required: Sequence[str] = ("exp", "role"),
    ) -> None:
        if secret is None and jwks is None:
            raise PresenceValueError(
                "JwtVerifier needs a secret (for HS256 tokens), a jwks (for asymmetric ones), "
                "or both"
            )
        self._secret: bytes | None = None
        self._short_secret: frozenset[str] = frozenset()
        if secret is not None:
            self._secret, self._short_secret = _load_secret(secret)
            if "HS256" in self._short_secret:  # longer algorithms are the token issuer's pick
                # PyJWT's own warning is silenced per token (see `_SHORT_KEY_WARNING`): say it
                # once here instead.  The length only, never the secret.
                logger.warning(
                    "the JWT secret is %d bytes, shorter than %s needs (32 bytes for HS256, "
                    "64 for HS512): a short secret can be guessed offline from one token",
                    len(self._secret),
                    ", ".join(sorted(self._short_secret)),
                )
        self._by_kid: dict[str, _Key] = {}
        self._sole: dict[str, _Key] = {}
        if jwks is not None:
            self._by_kid, self._sole = _load_jwks(jwks, "JWKS", need_keys=self._secret is None)

        self._audience: str | list[str] | None = _check_audience(audience)
        if issuer is not None:
            if not isinstance(issuer, str):
                raise PresenceTypeError(f"issuer must be a str, not {type_name(issuer)}")
            if not issuer:
                raise PresenceValueError("issuer must not be empty")
        self._issuer = issuer
        leeway_value = check_finite(leeway, "leeway", kind="a number of seconds (int or float)")
        if leeway_value < 0.0:
            raise PresenceValueError(f"leeway must be >= 0 seconds, got {leeway!r}")
        self._leeway = leeway_value
        self._required = _check_required(required)
        self._fields_reason = _fields_reason(self._required)
        # Built once and handed to PyJWT on every call (it does not mutate it).  Time claims are
        # checked here against the injected clock, not by PyJWT against its own; ``aud`` and
        # ``iss`` only when configured, since PyJWT refuses any token with an ``aud`` when no
        # audience is given.
        options: Options = {
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self._audience is not None,
            "verify_iss": self._issuer is not None,
            "require": list(self._required),
        }
        self._options = options
        # The HS* tokens the fast path may take: with the secret, and no audience or issuer
        # to check (Supabase's usual setup).  See `_verify_hmac`.
        self._fast_hmac: dict[str, str] = (
            {}
            if self._secret is None or self._audience is not None or self._issuer is not None
            else {
                alg: _HMAC_DIGESTS[alg] for alg in _HMAC_ALGORITHMS if alg not in self._short_secret
            }
        )

    @classmethod
    def from_jwks_file(
        cls,
        path: str | os.PathLike[str],
        *,
        secret: str | bytes | None = None,
        audience: str | Sequence[str] | None = None,
        issuer: str | None = None,
        leeway: float = 5.0,
        required: Sequence[str] = ("exp", "role"),
    ) -> JwtVerifier:
        """A verifier whose JWKS is read from the JSON file at ``path`` (plus an optional secret).

        Errors about the file or its keys name the file; none quotes key material.
        """
        where = os.fspath(path)
        try:
            with open(where, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise PresenceValueError(
                f"cannot read the JWKS file {where!r}: {exc.strerror or type(exc).__name__}"
            ) from None
        try:
            jwks = json.loads(data)
        except json.JSONDecodeError as exc:
            # The position only: the message of a decode error could quote the file.
            raise PresenceValueError(
                f"the JWKS file {where!r} is not valid JSON (line {exc.lineno}, column {exc.colno})"
            ) from None
        except ValueError:  # not UTF-8
            raise PresenceValueError(f"the JWKS file {where!r} is not UTF-8 JSON") from None
        # Checked here first so that its errors name the file.  Loading a few keys twice at
        # start-up is cheaper than a private way into __init__ that subclasses would bypass.
        _load_jwks(jwks, f"JWKS file {where!r}", need_keys=secret is None)
        return cls(
            secret=secret,
            jwks=jwks,
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            required=required,
        )

    def verify(self, token: str, *, now: float) -> Verified:
        """The verified claims of ``token`` at time ``now`` (unix seconds, e.g. ``time.time()``).

        Raises:
            TokenError: The token is refused; ``reason`` says why in the client's terms.  A
                token that is not a str is refused the same way (it comes from the wire).
            PresenceTypeError / PresenceValueError: ``now`` is not a finite number.
        """
        if type(now) is not float or now - now != 0.0:
            now = check_time(now)
        if type(token) is not str or not token.isascii():
            # Not a str, or not ASCII (a JWT is base64url and dots; a lone surrogate would
            # not even encode).
            raise TokenError(REASON_MALFORMED)
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenError(REASON_TOO_LONG)
        header, canonical = _peek_header(token)
        alg = header.get("alg")
        digest = self._fast_hmac.get(alg) if type(alg) is str else None
        claims = None
        if (
            digest is not None
            and canonical
            and header.keys() <= _PLAIN_HEADER
            and type(header.get("kid", "")) is str
            and type(header.get("typ", "")) is str
        ):
            claims = self._verify_hmac(token, digest)
        if claims is None:
            claims = self._verify_pyjwt(token, header)
        exp = _seconds(claims["exp"])  # present: "exp" is always required
        if exp is None:
            raise TokenError(REASON_BAD_EXP)
        leeway = self._leeway
        if exp <= now - leeway:
            raise TokenError(expired_reason(now, exp))
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None:
                seconds = _seconds(value)
                if seconds is None:
                    raise TokenError(f"InvalidJWTToken: Invalid claim `{name}`")
                if seconds > now + leeway:
                    raise TokenError(REASON_NOT_YET_VALID)
        return Verified(token, MappingProxyType(claims), exp)

    def _verify_hmac(self, token: str, digest: str) -> dict[str, Any] | None:
        """The claims of a plain HS* token whose signature and claims PyJWT would accept, or
        None: then PyJWT decides (and words the refusal).  Its JSON is read by `json`, as
        PyJWT's is (orjson would turn an int beyond 64 bits into a float).

        PyJWT costs about 30 µs per token, most of it generic machinery; this is about 5 µs,
        which a reconnect storm of thousands of clients feels (``bench/jwt_join.py``).  It
        accepts only a subset of what PyJWT accepts: the same signing input, the same
        base64url and JSON decoding, a header of just ``alg``, ``typ`` and ``kid`` (no
        ``crit``, no ``b64``), no audience or issuer configured, the required claims present,
        and ``sub`` and ``jti`` strings when present.  Anything else, a wrong signature
        included, goes to PyJWT.
        """
        assert self._secret is not None
        signing, dot, signature = token.rpartition(".")
        if not dot or signing.count(".") != 1:
            return None
        payload = signing.partition(".")[2]
        # The signature is compared in its one canonical encoding (unpadded base64url), so
        # "==" or stray characters after it, which lenient base64 decoding would skip, make
        # it another token for PyJWT to judge: a token's text names one token only.
        mac = urlsafe_b64encode(hmac.digest(self._secret, signing.encode("ascii"), digest))
        if not hmac.compare_digest(signature.encode("ascii"), mac.rstrip(b"=")):
            return None
        try:
            claims = json.loads(_canonical_b64(payload))
        except (ValueError, RecursionError):
            return None
        if type(claims) is not dict:
            return None
        for name in self._required:
            if claims.get(name) is None:  # PyJWT counts a null claim as missing
                return None
        for name in ("sub", "jti"):
            if name in claims and type(claims[name]) is not str:
                return None
        return claims

    def _verify_pyjwt(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        """The claims of ``token`` as PyJWT verifies them; its errors become `TokenError`."""
        key, short = self._key_for(header)
        try:
            if short and _SHORT_KEY_WARNING is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", _SHORT_KEY_WARNING)
                    claims = self._decode(token, key, header["alg"])
            else:
                claims = self._decode(token, key, header["alg"])
        # InvalidSignatureError derives from DecodeError: it must be caught first.
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError, jwt.InvalidKeyError):
            raise TokenError(REASON_SIGNATURE) from None
        except jwt.MissingRequiredClaimError as exc:
            # PyJWT also reports a token without ``aud`` / ``iss`` as a missing claim when an
            # audience / issuer is configured: that is a wrong audience / issuer to the client.
            if exc.claim not in self._required:
                if exc.claim == "aud":
                    raise TokenError(REASON_AUDIENCE) from None
                if exc.claim == "iss":
                    raise TokenError(REASON_ISSUER) from None
            raise TokenError(self._fields_reason) from None
        except jwt.InvalidAudienceError:
            raise TokenError(REASON_AUDIENCE) from None
        except jwt.InvalidIssuerError:
            raise TokenError(REASON_ISSUER) from None
        except jwt.DecodeError:
            raise TokenError(REASON_MALFORMED) from None
        except jwt.InvalidTokenError:
            # A ``sub`` or ``jti`` that is not a string, an unsupported ``crit`` extension...
            raise TokenError(REASON_INVALID) from None
        return claims

    def _key_for(self, header: Mapping[str, Any]) -> tuple[Any, bool]:
        # The key (and whether it is short) that may verify a token with this header, chosen by
        # the configuration: the header's ``alg`` only picks among configured keys, each of which
        # accepts only its own algorithms.  Anything else is a signature failure, whatever the
        # header says.
        alg = header.get("alg")
        if type(alg) is not str:
            raise TokenError(REASON_SIGNATURE)
        kid = header.get("kid")
        if kid is not None and type(kid) is not str:
            raise TokenError(REASON_MALFORMED)  # PyJWT refuses the header too
        if alg in _HMAC_ALGORITHMS:
            # An HS* token is checked with the secret only, never with a JWKS key (whose public
            # bytes an attacker knows).  Supabase's HS256 tokens carry a ``kid``: it is ignored.
            if self._secret is None:
                raise TokenError(REASON_SIGNATURE)
            return self._secret, alg in self._short_secret
        family = _FAMILY.get(alg)
        if family is None:
            raise TokenError(REASON_SIGNATURE)  # "none", "ES256K", "HS1"...
        entry = self._by_kid.get(kid) if kid is not None else self._sole.get(family)
        if entry is None or alg not in entry.algorithms:
            raise TokenError(REASON_SIGNATURE)
        return entry.key, entry.short

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        # ``algorithms`` is one algorithm that `_key_for` has already matched to this key.
        return jwt.decode(
            token,
            key,
            algorithms=[alg],
            options=self._options,
            audience=self._audience,
            issuer=self._issuer,
        )


def _peek_header(token: str) -> tuple[dict[str, Any], bool]:
    # The token's header, read to choose the key, and whether its segment is canonical
    # base64url (which the HS* fast path needs).  A header that is not is read leniently:
    # PyJWT then parses the whole token strictly and checks that its ``alg`` is the one the
    # key was chosen for, so anything read here that PyJWT refuses is refused by PyJWT.
    segment, dot, _ = token.partition(".")
    if not dot:
        raise TokenError(REASON_MALFORMED)
    try:
        try:
            data, canonical = _canonical_b64(segment), True
        except ValueError:
            data, canonical = urlsafe_b64decode(segment + "=" * (-len(segment) % 4)), False
        header = json.loads(data)
    except (ValueError, RecursionError):  # binascii.Error and JSONDecodeError are ValueErrors
        raise TokenError(REASON_MALFORMED) from None
    if type(header) is not dict:
        raise TokenError(REASON_MALFORMED)
    return header, canonical


def expired_reason(now: float, exp: float) -> str:
    """Why a token whose ``exp`` is past at ``now`` is refused, in Supabase Realtime's words."""
    return f"InvalidJWTToken: Token has expired {max(int(now - exp), 0)} seconds ago"


def _canonical_b64(segment: str) -> bytes:
    """A segment's bytes if it is unpadded base64url in its one canonical spelling (as PyJWT
    2.15 requires), else ValueError: the fast path must not take what PyJWT refuses."""
    if not _B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    data = urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if urlsafe_b64encode(data).rstrip(b"=") != segment.encode("ascii"):
        raise ValueError("not the canonical spelling")
    return data


def _seconds(value: object) -> float | None:
    # A NumericDate claim as finite float seconds, or None when it is not one (a bool, a
    # str, NaN or Infinity - which Python's json accepts -, an int beyond float range).
    if not is_number(value):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None
    if seconds - seconds != 0.0:
        return None
    return seconds


def _load_secret(secret: object) -> tuple[bytes, frozenset[str]]:
    # The secret as bytes, and the HS* algorithms for which PyJWT finds it short.
    if isinstance(secret, str):
        raw = secret.encode("utf-8", "surrogatepass")
    elif isinstance(secret, bytes):
        raw = secret
    else:
        raise PresenceTypeError(f"secret must be a str or bytes, not {type_name(secret)}")
    if not raw:
        raise PresenceValueError("secret must not be empty")
    algorithms = get_default_algorithms()
    try:
        prepared = algorithms["HS256"].prepare_key(raw)
    except jwt.InvalidKeyError:
        # PyJWT refuses a PEM / SSH / DER key or a JWK as an HMAC secret: verifying HS256 with
        # public key bytes is exactly the algorithm-confusion attack.
        raise PresenceValueError(
            "secret looks like an asymmetric key or a JWK, not an HMAC secret: "
            "give public keys as a jwks"
        ) from None
    short = frozenset(
        name
        for name in _HMAC_ALGORITHMS
        if getattr(algorithms[name], "check_key_length", _no_warning)(prepared) is not None
    )
    return prepared, short


def _no_warning(key: object) -> None:
    # PyJWT before 2.13 has no key length check.
    return None


def _load_jwks(
    jwks: object, source: str, *, need_keys: bool
) -> tuple[dict[str, _Key], dict[str, _Key]]:
    # The keys of a JWKS by kid, and for each family with exactly one key, that key (what a
    # token without a kid may use).  ``source`` names the JWKS in errors ("JWKS", or the file).
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise PresenceValueError(f"{source}: must be a JSON object with a 'keys' list")
    by_kid: dict[str, _Key] = {}
    families: dict[str, list[_Key]] = {}
    for index, jwk in enumerate(jwks["keys"]):
        where = f"{source}: key #{index}"
        if not isinstance(jwk, Mapping):
            raise PresenceValueError(f"{where} is not a JSON object")
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key: not for verifying signatures
        kid = jwk.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise PresenceValueError(f"{where} has a 'kid' that is not a non-empty string")
        entry = _load_jwk(jwk, where)
        if kid is not None:
            if kid in by_kid:
                # A kid names a public key, it is not secret; cut to keep the message short.
                raise PresenceValueError(
                    f"{where} has the same kid as an earlier key: {kid[:64]!r}"
                )
            by_kid[kid] = entry
        families.setdefault(entry.family, []).append(entry)
    if need_keys and not families:
        raise PresenceValueError(f"{source}: has no signing key, and no secret was given")
    sole = {family: entries[0] for family, entries in families.items() if len(entries) == 1}
    return by_kid, sole


def _load_jwk(jwk: Mapping[str, Any], where: str) -> _Key:
    # One JWK checked against the allow-list, then loaded.  Errors say which rule it breaks
    # and never quote its fields (other than its kid, in the caller).
    kty = jwk.get("kty")
    declared = jwk.get("alg")
    if declared is not None and not isinstance(declared, str):
        raise PresenceValueError(f"{where} has an 'alg' that is not a string")
    if kty == "oct":
        raise PresenceValueError(
            f"{where} is a symmetric ('oct') key: a JWKS is public, so symmetric keys are not "
            "accepted from it; pass the HMAC secret as `secret`"
        )
    if kty == "RSA":
        if declared is None:
            algorithms = _RSA_ALGORITHMS
        elif declared in _RSA_ALGORITHMS:
            algorithms = frozenset({declared})
        else:
            raise PresenceValueError(f"{where} is an RSA key with an 'alg' outside RS256..PS512")
    elif kty == "EC":
        crv = jwk.get("crv")
        alg = _EC_ALGORITHMS.get(crv) if isinstance(crv, str) else None
        if alg is None:
            raise PresenceValueError(
                f"{where} is an EC key on a curve other than P-256, P-384 or P-521"
            )
        if declared is not None and declared != alg:
            raise PresenceValueError(
                f"{where} is an EC key whose 'alg' does not match its curve (expected {alg})"
            )
        algorithms = frozenset({alg})
    elif kty == "OKP":
        if jwk.get("crv") not in _OKP_CURVES:
            raise PresenceValueError(
                f"{where} is an OKP key on a curve other than Ed25519 or Ed448"
            )
        if declared is not None and declared != "EdDSA":
            raise PresenceValueError(f"{where} is an OKP key whose 'alg' is not EdDSA")
        algorithms = frozenset({"EdDSA"})
    else:
        raise PresenceValueError(f"{where} has a key type ('kty') other than RSA, EC or OKP")
    family = cast(str, kty)
    name = min(algorithms)  # any of them: they load the key the same way
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=name).key
    except Exception as exc:
        # PyJWT's messages quote the JWK, private parts included: name the error type only.
        raise PresenceValueError(
            f"{where} ({family}) cannot be loaded as a key ({type(exc).__name__})"
        ) from None
    # A JWK with private parts loads as a private key; only its public half is needed (and a
    # private key object would not verify RSA signatures).
    public_key = getattr(key, "public_key", None)
    if callable(public_key):
        key = public_key()
    check = getattr(get_default_algorithms()[name], "check_key_length", _no_warning)
    return _Key(key=key, family=family, algorithms=algorithms, short=check(key) is not None)


def _check_audience(audience: object) -> str | list[str] | None:
    if audience is None:
        return None
    if isinstance(audience, str):
        if not audience:
            raise PresenceValueError("audience must not be empty")
        return audience
    if not isinstance(audience, Sequence):
        raise PresenceTypeError(
            f"audience must be a str or a sequence of str, not {type_name(audience)}"
        )
    values = list(audience)
    if not values:
        raise PresenceValueError("audience must not be an empty sequence")
    for value in values:
        if not isinstance(value, str):
            raise PresenceTypeError(f"audience values must be str, not {type_name(value)}")
        if not value:
            raise PresenceValueError("audience values must not be empty")
    return values


def _check_required(required: object) -> tuple[str, ...]:
    if isinstance(required, str) or not isinstance(required, Sequence):
        # A bare str is a Sequence of characters: ("exp") instead of ("exp",) is a slip.
        raise PresenceTypeError(
            f"required must be a sequence of claim names, not {type_name(required)}"
        )
    names: list[str] = []
    for name in required:
        if not isinstance(name, str):
            raise PresenceTypeError(f"required claim names must be str, not {type_name(name)}")
        if not name:
            raise PresenceValueError("required claim names must not be empty")
        if name not in names:
            names.append(name)
    if "exp" not in names:
        raise PresenceValueError(
            "required must include 'exp': the server re-checks each connection when its token "
            "expires, and a token without one would never end"
        )
    return tuple(names)


def _fields_reason(required: tuple[str, ...]) -> str:
    if set(required) == {"exp", "role"}:
        return _REASON_DEFAULT_FIELDS  # Supabase Realtime's own text
    if len(required) == 1:
        return f"Field `{required[0]}` is required in JWT"
    return "Fields " + ", ".join(f"`{name}`" for name in required) + " are required in JWT"


@dataclass(frozen=True, slots=True)
class Access:
    """What a policy grants one connection on one private topic.

    The four rights are Supabase Realtime's (``realtime.messages`` RLS policies on
    ``presence`` / ``broadcast``, ``select`` / ``insert``).  A right not granted is refused:
    the default `Access()` is `Access.NONE`.
    """

    presence_read: bool = False
    presence_write: bool = False
    broadcast_read: bool = False
    broadcast_write: bool = False

    ALL: ClassVar[Access]
    """Every right."""
    NONE: ClassVar[Access]
    """No right: the join is refused."""

    def __post_init__(self) -> None:
        # A policy returning Access("no") would otherwise grant a right by truthiness.
        for name in ("presence_read", "presence_write", "broadcast_read", "broadcast_write"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise PresenceTypeError(f"Access.{name} must be a bool, not {type_name(value)}")

    @property
    def any_read(self) -> bool:
        """Whether anything may be read: a join with no read right at all is refused."""
        return self.presence_read or self.broadcast_read


Access.ALL = Access(True, True, True, True)
Access.NONE = Access()


def load_policy(spec: str) -> Policy:
    """The policy callable named by ``"package.module:callable"``.

    The part after the colon may be a dotted attribute path (``"app.auth:Policies.check"``).
    The module is imported, so this runs its top-level code.

    Raises:
        PresenceValueError: ``spec`` is not of that form, the module cannot be imported (the
            import error's message is kept), it has no such attribute, or the attribute is not
            callable.
    """
    if not isinstance(spec, str):
        raise PresenceTypeError(f"a policy spec must be a str, not {type_name(spec)}")
    module_name, colon, path = spec.partition(":")
    parts = path.split(".")
    if (
        not colon
        or not all(part.isidentifier() for part in module_name.split("."))
        or not all(part.isidentifier() for part in parts)
    ):
        raise PresenceValueError(
            f"a policy must be given as 'package.module:callable', got {spec!r}"
        )
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise PresenceValueError(
            f"cannot import the policy module {module_name!r} (from {spec!r}): {exc}"
        ) from exc
    for depth, part in enumerate(parts):
        try:
            target = getattr(target, part)
        except AttributeError:
            owner = ".".join([module_name, *parts[:depth]])
            raise PresenceValueError(
                f"policy {spec!r}: {owner!r} has no attribute {part!r}"
            ) from None
    if not callable(target):
        raise PresenceValueError(
            f"policy {spec!r} is not callable (it is a {type_name(target)} object); "
            "it must be a callable taking (claims, topic)"
        )
    return cast("Policy", target)

"""Lead PII (e-mail, phone, name): masked forms for logs and the dashboard, and where to find it."""

from __future__ import annotations

import re
from typing import Any

# keys whose values are personal whatever they hold (a log's `extra=`; `name` is taken there)
PII_KEYS = frozenset({"email", "lead_email", "email_lead", "lead_name", "phone", "lead_phone",
                      "mobile_phone", "personal_phone", "recipient"})
PHONE_KEYS = ("mobile_phone", "personal_phone", "phone")
# "@" or its percent-encoding "%40" (no letters in it, so no case to mind): a URL that holds a
# lead key such as email:<address>, as urllib3 logs it at DEBUG. A local part is at most 64
# characters (RFC 5321) and a domain's label 63 (RFC 1035): unbounded, each start in a long token
# would scan to its end (quadratic); bounded, a longer run only masks its last 64 before the "@".
# A last label that is a file's extension (logo@2x.png, report%40v2.pdf) is no address: none of
# these is a top-level domain (the Public Suffix List's ICANN section; .zip, .mov are, and stay).
_FILE = r"(?i:png|jpe?g|gif|svg|webp|ico|bmp|pdf|html?|css|js|json|txt|xml|csv|ya?ml|docx?|xlsx?)"
EMAIL_RE = re.compile(r"\w[\w.!#$%&'*+/=?^`{|}~-]{0,63}(?:@|%40)[\w-]{1,63}(?:\.[\w-]{1,63})*"
                      rf"\.(?!{_FILE}\b)[^\W\d_]{{2,}}")
_AT = re.compile(r"@|%40")
# an international number (+55 11 91234-5678) or one with an area code in brackets
PHONE_RE = re.compile(r"\+\d[\d ().-]{6,}\d|\(\d{2,3}\)[\d .-]{6,}\d")


def mask_email(value: str) -> str:
    """maria.souza@example.com.br -> m***@***.br: enough to tell two apart, not to write (the
    percent-encoded maria%40example.com.br -> m***%40***.br)."""
    parts = _AT.split(value, maxsplit=1)
    if len(parts) < 2 or not parts[1]:
        return "***"
    at = _AT.search(value).group()  # type: ignore[union-attr]
    return f"{parts[0][:1]}***{at}***.{parts[1].rsplit('.', 1)[-1]}"


def mask_phone(value: str) -> str:
    """+55 11 91234-5678 -> ***78."""
    digits = re.sub(r"\D", "", value)
    return f"***{digits[-2:]}" if len(digits) > 4 else "***"


def mask_name(value: str) -> str:
    """Maria Souza -> M*** S***."""
    return " ".join(f"{part[:1]}***" for part in value.split()) or "***"


def mask_value(key: str, value: Any) -> Any:
    """The masked form of one PII field's value, whatever it holds: a string masked by its kind,
    a number as its digits would be (a phone sent as a number), lists and objects masked inside;
    None, booleans and empty strings as they are."""
    if isinstance(value, dict):
        return {k: mask_value(key, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(key, v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        return value
    if "email" in key or _AT.search(value):
        return mask_email(value)
    if "phone" in key:
        return mask_phone(value)
    return mask_name(value)


def mask_text(text: str) -> str:
    """Free text (a log message, an error, a quarantine reason) with e-mails and phones masked."""
    if "@" in text or "%40" in text:
        text = EMAIL_RE.sub(lambda m: mask_email(m.group()), text)
    if "+" in text or "(" in text:
        text = PHONE_RE.sub(lambda m: mask_phone(m.group()), text)
    return text


def mask(value: Any, key: str = "") -> Any:
    """A JSON-like value with PII keys' values masked and e-mails/phones in strings masked."""
    if isinstance(value, dict):
        return {k: mask(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask(v, key) for v in value]
    if key in PII_KEYS:
        return mask_value(key, value)
    if isinstance(value, str):
        return mask_text(value)
    return value


def _holder(body: Any) -> dict[str, Any] | None:
    """The object describing the person in an RD body: the first one with an `email`."""
    stack = [body]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if isinstance(node.get("email"), str):
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    if isinstance(body, dict):  # a contact without e-mail still has a name or a phone
        for candidate in (body.get("contact"), *(body.get("leads") or [None])[:1]):
            if isinstance(candidate, dict):
                return candidate
    return None


def person(body: Any) -> dict[str, str | None]:
    """{"email", "name", "phone"} of the person an RD body is about (None where absent)."""
    found = _holder(body) or {}
    phone = next((found[k] for k in PHONE_KEYS if isinstance(found.get(k), str) and found[k]),
                 None)
    return {"email": found.get("email") or None, "name": found.get("name") or None,
            "phone": phone}


def masked_person(body: Any) -> dict[str, str | None]:
    return {k: mask_value(k, v) for k, v in person(body).items()}

//! The S3-compatible endpoint, driven by real S3 clients: the AWS CLI and
//! boto3 that `cargo xtask test` installs (pinned, from PyPI) into a venv
//! whose `bin` folder it passes as `MAYFLY_S3_CLIENTS`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Node, eventually};
use crate::events::{admin, deliveries};

/// The clients' `bin` folder (`aws`, `python` with boto3,
/// `openapi-spec-validator`).
pub(crate) fn clients() -> PathBuf {
    if let Ok(error) = std::env::var("MAYFLY_S3_CLIENTS_ERROR") {
        panic!("the S3 clients (AWS CLI, boto3) could not be installed: {error}");
    }
    let bin = match std::env::var_os("MAYFLY_S3_CLIENTS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/mayfly-s3-clients/venv/bin"),
    };
    assert!(
        bin.join("aws").exists() && bin.join("python").exists(),
        "{} holds no AWS CLI and boto3: run `cargo xtask s3-clients` (or the whole suite with \
         `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// An S3 key pair.
struct Key {
    id: String,
    secret: String,
}

/// Creates an S3 key for `buckets` with `mayfly token create --s3`.
fn create_key(node: &Node, buckets: &[&str]) -> Key {
    let mut args = vec!["token", "create", "--s3", "--name", "test"];
    for bucket in buckets {
        args.extend(["--bucket", bucket]);
    }
    let (ok, stdout, stderr) = node.cli(&args);
    assert!(ok, "token create --s3 failed: {stdout}{stderr}");
    let value = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .to_string()
    };
    Key {
        id: value("AWS_ACCESS_KEY_ID"),
        secret: value("AWS_SECRET_ACCESS_KEY"),
    }
}

/// A client process with the key and endpoint in its environment (and no
/// AWS configuration of the machine's user).
fn client(node: &Node, key: &Key, program: &str, home: &Path) -> Command {
    let mut command = Command::new(clients().join(program));
    command
        .env_clear()
        .env("PATH", clients())
        .env("HOME", home)
        .env("AWS_ACCESS_KEY_ID", &key.id)
        .env("AWS_SECRET_ACCESS_KEY", &key.secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", &node.s3)
        // No silent retries: a request that fails once fails the test.
        .env("AWS_MAX_ATTEMPTS", "1")
        .env("MAYFLY_S3", &node.s3);
    command
}

/// Runs `aws ARGS`; returns stdout, panicking with stderr on failure.
fn aws(node: &Node, key: &Key, home: &Path, args: &[&str]) -> String {
    let output = client(node, key, "aws", home)
        .args(args)
        .output()
        .expect("aws runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "aws {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs a boto3 script (it gets `s3`, a client on the endpoint, and
/// `endpoint`); panics with its output unless it exits 0.
fn boto3(node: &Node, key: &Key, home: &Path, script: &str) -> String {
    let prelude = "import os, json, boto3, botocore\n\
        from botocore.config import Config\n\
        endpoint = os.environ['MAYFLY_S3']\n\
        s3 = boto3.client('s3', endpoint_url=endpoint, \
        config=Config(signature_version='s3v4', s3={'addressing_style': 'path'}, \
        retries={'max_attempts': 1}))\n\
        def code(call):\n    \
            try:\n        call()\n    \
            except botocore.exceptions.ClientError as e:\n        \
                return e.response['Error']['Code']\n    \
            return 'no error'\n";
    let output = client(node, key, "python", home)
        .arg("-c")
        .arg(format!("{prelude}{script}"))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "boto3 script failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn start(dir: &Path) -> Node {
    Node::start_with(dir, &["--s3-listen", "127.0.0.1:0"])
}

#[test]
fn aws_cli_and_boto3_put_get_list_copy_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data"));
    let key = create_key(&node, &["photos", "docs"]);
    let home = home.path();

    // Buckets: created, listed, refused twice.
    aws(&node, &key, home, &["s3", "mb", "s3://photos"]);
    aws(
        &node,
        &key,
        home,
        &["s3api", "create-bucket", "--bucket", "docs"],
    );
    let listed = aws(&node, &key, home, &["s3", "ls"]);
    assert!(
        listed.contains("photos") && listed.contains("docs"),
        "{listed}"
    );

    // cp up and down, byte for byte; the REST API sees the same object.
    let local = dir.path().join("cat.txt");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&local, &bytes).unwrap();
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "cp",
            local.to_str().unwrap(),
            "s3://photos/2024/cat.txt",
        ],
    );
    let back = dir.path().join("back.txt");
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "cp",
            "s3://photos/2024/cat.txt",
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&back).unwrap(), bytes);
    let (status, page) = admin(&node, "GET", "/v1/buckets/photos/objects", &[], b"");
    assert_eq!(status, 200);
    assert_eq!(page["objects"][0]["key"], "2024/cat.txt", "{page}");
    assert_eq!(page["objects"][0]["size"], 200_000, "{page}");

    // An object written through the REST API is readable through S3.
    let (status, _) = admin(
        &node,
        "PUT",
        "/v1/buckets/docs/objects/notes/readme.md",
        &[("content-type", "text/markdown")],
        b"# hello",
    );
    assert_eq!(status, 200);

    // sync of a folder, then listing with a delimiter.
    let folder = dir.path().join("site");
    for i in 0..40 {
        let sub = folder.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i}.txt")), format!("file {i}")).unwrap();
    }
    aws(
        &node,
        &key,
        home,
        &["s3", "sync", folder.to_str().unwrap(), "s3://docs/site/"],
    );
    let listed = aws(&node, &key, home, &["s3", "ls", "s3://docs/site/"]);
    for d in ["d0/", "d1/", "d2/", "d3/"] {
        assert!(listed.contains(&format!("PRE {d}")), "{listed}");
    }
    // A second sync finds nothing to do.
    let again = aws(
        &node,
        &key,
        home,
        &["s3", "sync", folder.to_str().unwrap(), "s3://docs/site/"],
    );
    assert!(again.trim().is_empty(), "{again}");

    // boto3: ranges, metadata, checksums, paging with delimiters, copy,
    // batch delete.
    let out = boto3(
        &node,
        &key,
        home,
        r#"
import hashlib
body = bytes(range(256)) * 64
put = s3.put_object(Bucket='photos', Key='raw/a.bin', Body=body, ContentType='image/x-test',
                    Metadata={'camera': 'pinhole'}, ChecksumAlgorithm='CRC32')
assert put['ETag'] == '"%s"' % hashlib.md5(body).hexdigest(), put['ETag']
head = s3.head_object(Bucket='photos', Key='raw/a.bin')
assert head['ContentLength'] == len(body)
assert head['ContentType'] == 'image/x-test'
assert head['Metadata'] == {'camera': 'pinhole'}, head['Metadata']
got = s3.get_object(Bucket='photos', Key='raw/a.bin', Range='bytes=10-19')
assert got['Body'].read() == body[10:20]
assert got['ContentRange'] == 'bytes 10-19/%d' % len(body), got['ContentRange']
tail = s3.get_object(Bucket='photos', Key='raw/a.bin', Range='bytes=-5')['Body'].read()
assert tail == body[-5:]
assert code(lambda: s3.get_object(Bucket='photos', Key='raw/a.bin',
                                  Range='bytes=99999-')) == 'InvalidRange'
whole = s3.get_object(Bucket='photos', Key='raw/a.bin', ChecksumMode='ENABLED')
assert whole['Body'].read() == body
# The REST API's object, through S3.
readme = s3.get_object(Bucket='docs', Key='notes/readme.md')
assert readme['Body'].read() == b'# hello' and readme['ContentType'] == 'text/markdown'
# Listing: delimiter and pages of 3.
seen, prefixes, token = [], [], None
while True:
    args = dict(Bucket='docs', Prefix='site/', Delimiter='/', MaxKeys=3)
    if token:
        args['ContinuationToken'] = token
    page = s3.list_objects_v2(**args)
    prefixes += [p['Prefix'] for p in page.get('CommonPrefixes', [])]
    seen += [o['Key'] for o in page.get('Contents', [])]
    if not page['IsTruncated']:
        break
    token = page['NextContinuationToken']
assert prefixes == ['site/d0/', 'site/d1/', 'site/d2/', 'site/d3/'], prefixes
assert seen == [], seen
keys = []
for page in s3.get_paginator('list_objects_v2').paginate(Bucket='docs', Prefix='site/d1/',
                                                          PaginationConfig={'PageSize': 4}):
    keys += [o['Key'] for o in page.get('Contents', [])]
assert len(keys) == 10 and keys == sorted(keys), keys
# Copy keeps metadata; replace changes it.
s3.copy_object(Bucket='docs', Key='copied.bin', CopySource={'Bucket': 'photos', 'Key': 'raw/a.bin'})
copied = s3.head_object(Bucket='docs', Key='copied.bin')
assert copied['Metadata'] == {'camera': 'pinhole'} and copied['ContentLength'] == len(body)
assert copied['ETag'] == put['ETag']
# Batch delete, then the objects are gone (and deleting again is fine).
gone = s3.delete_objects(Bucket='docs', Delete={'Objects': [{'Key': 'copied.bin'},
                                                            {'Key': 'never-was'}]})
assert sorted(d['Key'] for d in gone['Deleted']) == ['copied.bin', 'never-was'], gone
assert code(lambda: s3.head_object(Bucket='docs', Key='copied.bin')) == '404'
assert code(lambda: s3.get_object(Bucket='docs', Key='copied.bin')) == 'NoSuchKey'
s3.delete_object(Bucket='docs', Key='copied.bin')
assert code(lambda: s3.delete_bucket(Bucket='photos')) == 'BucketNotEmpty'
assert code(lambda: s3.create_bucket(Bucket='photos')) == 'BucketAlreadyOwnedByYou'
assert code(lambda: s3.get_object(Bucket='nothing-here', Key='x')) in ('AccessDenied',)
print('ok')
"#,
    );
    assert_eq!(out.trim(), "ok");

    // rm, then the bucket can go.
    aws(
        &node,
        &key,
        home,
        &["s3", "rm", "--recursive", "s3://photos"],
    );
    aws(&node, &key, home, &["s3", "rb", "s3://photos"]);
    let listed = aws(&node, &key, home, &["s3", "ls"]);
    assert!(!listed.contains("photos"), "{listed}");
    node.stop();
}

#[test]
fn presigned_urls_and_refusals_carry_the_s3_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data"));
    let key = create_key(&node, &["shared"]);
    let other = create_key(&node, &["elsewhere"]);
    let home = home.path();
    aws(&node, &key, home, &["s3", "mb", "s3://shared"]);

    let script = format!(
        r#"
import time, urllib.request, urllib.error
other_id, other_secret = {other_id:?}, {other_secret:?}
# Presigned PUT, then presigned GET, over plain HTTP without a client.
url = s3.generate_presigned_url('put_object', Params={{'Bucket': 'shared', 'Key': 'up.txt'}},
                                ExpiresIn=300)
request = urllib.request.Request(url, data=b'presigned body', method='PUT')
assert urllib.request.urlopen(request).status == 200
url = s3.generate_presigned_url('get_object', Params={{'Bucket': 'shared', 'Key': 'up.txt'}},
                                ExpiresIn=300)
assert urllib.request.urlopen(url).read() == b'presigned body'

def http_code(url, data=None, method='GET'):
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=data, method=method))
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        return body.split('<Code>')[1].split('</Code>')[0]
    return 'no error'

# A tampered presigned URL: the signature no longer matches.
tampered = url.replace('up.txt', 'other.txt')
assert http_code(tampered) == 'SignatureDoesNotMatch', http_code(tampered)
# An expired one.
short = s3.generate_presigned_url('get_object', Params={{'Bucket': 'shared', 'Key': 'up.txt'}},
                                  ExpiresIn=1)
deadline = time.time() + 30
while http_code(short) == 'no error' and time.time() < deadline:
    time.sleep(0.5)
assert http_code(short) == 'AccessDenied', http_code(short)

def client(key_id, secret):
    return boto3.client('s3', endpoint_url=endpoint, aws_access_key_id=key_id,
                        aws_secret_access_key=secret,
                        config=Config(signature_version='s3v4',
                                      s3={{'addressing_style': 'path'}},
                                      retries={{'max_attempts': 1}}))
wrong_secret = client({key_id:?}, 'x' * 40)
assert code(lambda: wrong_secret.get_object(Bucket='shared', Key='up.txt')) == \
    'SignatureDoesNotMatch'
unknown = client('MFAAAAAAAAAAAAAAAAAA', 'x' * 40)
assert code(lambda: unknown.list_buckets()) == 'InvalidAccessKeyId'
ungranted = client(other_id, other_secret)
assert code(lambda: ungranted.get_object(Bucket='shared', Key='up.txt')) == 'AccessDenied'
assert code(lambda: ungranted.put_object(Bucket='shared', Key='x', Body=b'x')) == 'AccessDenied'
assert [b['Name'] for b in ungranted.list_buckets()['Buckets']] == []
assert code(lambda: s3.copy_object(Bucket='shared', Key='stolen',
                                   CopySource={{'Bucket': 'elsewhere', 'Key': 'x'}})) == \
    'AccessDenied'
# Anonymous requests are refused.
assert http_code(endpoint + '/shared/up.txt') == 'AccessDenied'
print('ok')
"#,
        key_id = key.id,
        other_id = other.id,
        other_secret = other.secret,
    );
    assert_eq!(boto3(&node, &key, home, &script).trim(), "ok");

    // A revoked key is refused from then on.
    let (ok, _, stderr) = node.cli(&["token", "revoke", &key.id]);
    assert!(ok, "{stderr}");
    let out = boto3(&node, &key, home, "print(code(lambda: s3.list_buckets()))");
    assert_eq!(out.trim(), "InvalidAccessKeyId");
    // Keys are not users' secrets.
    let (_, secrets, _) = node.cli(&["--json", "secret", "list"]);
    assert!(!secrets.contains(&other.id), "{secrets}");
    let (_, keys, _) = node.cli(&["--json", "token", "list", "--s3"]);
    let keys: Value = serde_json::from_str(&keys).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys[0]["access_key_id"], json!(other.id));
    assert!(!keys.to_string().contains(&other.secret));
    node.stop();
}

#[test]
fn an_aws_s3_cp_fires_the_object_trigger_once() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data"));
    node.deploy("ev", "events", &[]);
    let (status, trigger) = admin(
        &node,
        "POST",
        "/v1/functions/ev/triggers",
        &[("content-type", "application/json")],
        json!({"source": {"kind": "object", "bucket": "inbox", "prefix": "", "suffix": ""}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 201, "{trigger}");
    let key = create_key(&node, &["inbox"]);
    let home = home.path();
    aws(&node, &key, home, &["s3", "mb", "s3://inbox"]);
    let local = dir.path().join("report.csv");
    std::fs::write(&local, "a,b\n1,2\n").unwrap();
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "cp",
            local.to_str().unwrap(),
            "s3://inbox/reports/report.csv",
            "--content-type",
            "text/csv",
        ],
    );
    let created = |subject: &str| {
        deliveries(&node, "ev")
            .into_iter()
            .filter(|e| e.get("type") == "dev.mayfly.object.created" && e.get("subject") == subject)
            .collect::<Vec<_>>()
    };
    let first = eventually(Duration::from_secs(30), "the object event", || {
        created("reports/report.csv").into_iter().next()
    });
    // The data is the object's metadata, as for a REST write (the guest
    // logs its first 200 characters).
    for field in [r#""bucket":"inbox""#, r#""content_type":"text/csv""#] {
        assert!(first.body.contains(field), "{}", first.body);
    }
    // A duplicate of the first event would have been queued when its
    // write was, before the marker's: once the marker's has arrived, the
    // first write's count is final.
    aws(
        &node,
        &key,
        home,
        &["s3", "cp", local.to_str().unwrap(), "s3://inbox/marker"],
    );
    eventually(Duration::from_secs(30), "the marker's event", || {
        created("marker").into_iter().next()
    });
    assert_eq!(created("reports/report.csv").len(), 1);
    node.stop();
}

#[test]
fn a_multipart_upload_is_one_object_with_the_multipart_etag() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data"));
    let key = create_key(&node, &["big"]);
    let home = home.path();
    aws(&node, &key, home, &["s3", "mb", "s3://big"]);
    // 20 MiB: the AWS CLI sends it in 8 MiB parts (3 of them).
    let local = dir.path().join("big.bin");
    let bytes: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &bytes).unwrap();
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "cp",
            "--only-show-errors",
            local.to_str().unwrap(),
            "s3://big/blob.bin",
        ],
    );
    let head: Value = serde_json::from_str(&aws(
        &node,
        &key,
        home,
        &[
            "s3api",
            "head-object",
            "--bucket",
            "big",
            "--key",
            "blob.bin",
        ],
    ))
    .unwrap();
    assert_eq!(head["ContentLength"], 20 << 20, "{head}");
    assert!(
        head["ETag"].as_str().unwrap().ends_with("-3\""),
        "not the multipart form: {head}"
    );
    let back = dir.path().join("back.bin");
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "cp",
            "--only-show-errors",
            "s3://big/blob.bin",
            back.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the download differs"
    );
    // The parts are gone once joined; the REST API sees one object.
    let (status, page) = admin(&node, "GET", "/v1/buckets/big/objects", &[], b"");
    assert_eq!(status, 200);
    assert_eq!(page["objects"].as_array().unwrap().len(), 1, "{page}");
    let uploads = dir.path().join("data/s3-uploads");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0);

    // boto3: list parts, a part past the end and a small part refused,
    // abort.
    let out = boto3(
        &node,
        &key,
        home,
        r#"
up = s3.create_multipart_upload(Bucket='big', Key='later.bin')['UploadId']
e1 = s3.upload_part(Bucket='big', Key='later.bin', UploadId=up, PartNumber=1, Body=b'a' * 100)['ETag']
e2 = s3.upload_part(Bucket='big', Key='later.bin', UploadId=up, PartNumber=2, Body=b'b' * 50)['ETag']
parts = s3.list_parts(Bucket='big', Key='later.bin', UploadId=up)['Parts']
assert [(p['PartNumber'], p['Size']) for p in parts] == [(1, 100), (2, 50)], parts
assert code(lambda: s3.complete_multipart_upload(Bucket='big', Key='later.bin', UploadId=up,
    MultipartUpload={'Parts': [{'PartNumber': 1, 'ETag': e1}, {'PartNumber': 3, 'ETag': e1}]})) \
    == 'InvalidPart'
# Every part but the last must be 5 MiB or more, as in S3; the upload
# survives the refusal, and a small last part alone completes.
assert code(lambda: s3.complete_multipart_upload(Bucket='big', Key='later.bin', UploadId=up,
    MultipartUpload={'Parts': [{'PartNumber': 1, 'ETag': e1}, {'PartNumber': 2, 'ETag': e2}]})) \
    == 'EntityTooSmall'
s3.complete_multipart_upload(Bucket='big', Key='later.bin', UploadId=up,
    MultipartUpload={'Parts': [{'PartNumber': 2, 'ETag': e2}]})
assert s3.get_object(Bucket='big', Key='later.bin')['Body'].read() == b'b' * 50
# Abort.
up = s3.create_multipart_upload(Bucket='big', Key='never.bin')['UploadId']
s3.upload_part(Bucket='big', Key='never.bin', UploadId=up, PartNumber=1, Body=b'a' * 100)
s3.abort_multipart_upload(Bucket='big', Key='never.bin', UploadId=up)
assert code(lambda: s3.list_parts(Bucket='big', Key='never.bin', UploadId=up)) == 'NoSuchUpload'
assert code(lambda: s3.head_object(Bucket='big', Key='never.bin')) == '404'
print('ok')
"#,
    );
    assert_eq!(out.trim(), "ok");
    node.stop();
}

#[test]
fn a_functions_s3_key_presigns_for_its_granted_buckets_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    // Function keys live as long as credentials: 5 s here, so that expiry
    // is seen within the test.
    let node = Node::start_with(
        &dir.path().join("data"),
        &["--s3-listen", "127.0.0.1:0", "--credential-ttl", "5s"],
    );
    let key = create_key(&node, &["media", "private"]);
    let home = home.path();
    node.deploy_with("presigner", "caps", &[], &["--object-bucket", "media"]);
    // The function learns where the endpoint is.
    let (status, url) = node.invoke_get("presigner", "/config/get?key=mayfly.s3_url");
    assert_eq!((status, url.trim()), (200, node.s3.as_str()));

    // The script reads the function's key the way the function does (its
    // wasi:config), right before using it: the 5 s start then.
    let script = format!(
        r#"
import base64, time, urllib.request, urllib.error
s3.create_bucket(Bucket='media')
s3.create_bucket(Bucket='private')
s3.put_object(Bucket='media', Key='cat.jpg', Body=b'meow' * 1000)
s3.put_object(Bucket='private', Key='diary.txt', Body=b'dear diary')

def function_key():
    request = urllib.request.Request(
        {admin:?} + '/v1/functions/presigner/invoke?method=GET&path=%2Fconfig%2Fget%3Fkey%3Dmayfly.s3_key',
        method='POST', headers={{'authorization': 'Bearer ' + {token:?}}})
    return urllib.request.urlopen(request).read().decode().strip().split(':')

def client(key_id, secret):
    return boto3.client('s3', endpoint_url=endpoint, aws_access_key_id=key_id,
                        aws_secret_access_key=secret,
                        config=Config(signature_version='s3v4',
                                      s3={{'addressing_style': 'path'}},
                                      retries={{'max_attempts': 1}}))

def http_code(url):
    try:
        urllib.request.urlopen(url)
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        return body.split('<Code>')[1].split('</Code>')[0]
    return 'no error'

key_id, secret = function_key()
assert key_id.startswith('MFFN'), key_id
fn = client(key_id, secret)
# A presigned GET for the granted bucket works over plain HTTP.
url = fn.generate_presigned_url('get_object', Params={{'Bucket': 'media', 'Key': 'cat.jpg'}},
                                ExpiresIn=3600)
assert urllib.request.urlopen(url).read() == b'meow' * 1000
# Another bucket: refused, presigned or not; listing shows only its own.
denied = fn.generate_presigned_url('get_object',
                                   Params={{'Bucket': 'private', 'Key': 'diary.txt'}})
assert http_code(denied) == 'AccessDenied', http_code(denied)
assert code(lambda: fn.get_object(Bucket='private', Key='diary.txt')) == 'AccessDenied'
assert [b['Name'] for b in fn.list_buckets()['Buckets']] == ['media']
# The claims are bound to the secret: widening them breaks the signature.
payload = key_id[4:]
claims = json.loads(base64.urlsafe_b64decode(payload + '=' * (-len(payload) % 4)))
assert claims['objects'] == ['media'], claims
claims['objects'] = ['media', 'private']
forged = 'MFFN' + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip('=')
assert code(lambda: client(forged, secret).get_object(Bucket='private', Key='diary.txt')) \
    == 'SignatureDoesNotMatch'
# Once the key has expired, so has every URL presigned with it.
deadline = time.time() + 30
while http_code(url) == 'no error' and time.time() < deadline:
    time.sleep(0.25)
assert http_code(url) == 'ExpiredToken', http_code(url)
assert code(lambda: fn.list_objects_v2(Bucket='media')) == 'ExpiredToken'
print('ok')
"#,
        admin = node.admin,
        token = node.token,
    );
    assert_eq!(boto3(&node, &key, home, &script).trim(), "ok");
    node.stop();
}

/// The SHA-256 (hex) of `len` bytes of `path` from `start` (to the end
/// with `None`), by the clients' Python.
fn sha256(path: &Path, start: u64, len: Option<u64>) -> String {
    let script = "import hashlib, sys\n\
        f = open(sys.argv[1], 'rb'); f.seek(int(sys.argv[2]))\n\
        left = int(sys.argv[3]); h = hashlib.sha256()\n\
        while left != 0:\n    \
            chunk = f.read(1 << 20 if left < 0 else min(left, 1 << 20))\n    \
            if not chunk: break\n    \
            h.update(chunk); left -= len(chunk)\n\
        print(h.hexdigest())\n";
    let output = Command::new(clients().join("python"))
        .args(["-c", script])
        .arg(path)
        .arg(start.to_string())
        .arg(
            len.map_or(-1, |len| i64::try_from(len).unwrap())
                .to_string(),
        )
        .output()
        .expect("python runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Writes `size` pseudo-random (incompressible) bytes to `path`, a MiB at
/// a time.
fn write_random_file(path: &Path, size: u64) {
    use std::io::Write as _;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            // xorshift64: cheap, and no two MiB alike.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap();
        file.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
}

/// Samples the node's resident memory every few milliseconds until
/// dropped; the largest sample is kept.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(crate::common::proc_status_bytes(pid, "VmRSS"));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// The largest resident size seen.
    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Size of the large object in MB (MiB): 200 unless
/// `MAYFLY_S3_BIG_MB` says otherwise.
fn big_object_mib() -> u64 {
    std::env::var("MAYFLY_S3_BIG_MB")
        .ok()
        .and_then(|mb| mb.parse().ok())
        .unwrap_or(200)
}

#[test]
fn a_200_mb_object_goes_up_and_down_with_the_aws_cli_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data"));
    let key = create_key(&node, &["big"]);
    let home = home.path();
    aws(&node, &key, home, &["s3", "mb", "s3://big"]);
    let size = big_object_mib() << 20;
    let local = dir.path().join("big.bin");
    write_random_file(&local, size);
    let want = sha256(&local, 0, None);
    let before = node.rss_bytes();
    let sampler = RssSampler::start(node.pid());

    // Up: the AWS CLI sends it in 8 MiB parts, ten at a time.
    let started = std::time::Instant::now();
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "cp",
            "--only-show-errors",
            local.to_str().unwrap(),
            "s3://big/blob.bin",
        ],
    );
    let up = started.elapsed();
    // Down whole (the CLI fetches ranges of it in parallel).
    let started = std::time::Instant::now();
    let back = dir.path().join("back.bin");
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "cp",
            "--only-show-errors",
            "s3://big/blob.bin",
            back.to_str().unwrap(),
        ],
    );
    let down = started.elapsed();
    // One range, across part boundaries.
    let (first, last) = (size / 2 + 12_345, size - 1_000);
    let part = dir.path().join("range.bin");
    let started = std::time::Instant::now();
    let head: Value = serde_json::from_str(&aws(
        &node,
        &key,
        home,
        &[
            "s3api",
            "get-object",
            "--bucket",
            "big",
            "--key",
            "blob.bin",
            "--range",
            &format!("bytes={first}-{last}"),
            part.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let ranged = started.elapsed();
    let peak = sampler.finish();
    let high_water = node.peak_rss_bytes();

    assert_eq!(head["ContentLength"], last - first + 1, "{head}");
    assert_eq!(
        head["ContentRange"],
        format!("bytes {first}-{last}/{size}"),
        "{head}"
    );
    assert_eq!(sha256(&back, 0, None), want, "the whole download differs");
    assert_eq!(
        sha256(&part, 0, None),
        sha256(&local, first, Some(last - first + 1)),
        "the range differs"
    );
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    eprintln!(
        "S3 {} MiB: up {up:.1?}, down {down:.1?}, range of {:.1} MiB {ranged:.1?}; node RSS \
         before {:.0} MiB, sampled peak {:.0} MiB, high-water mark {:.0} MiB",
        size >> 20,
        mib(last - first + 1),
        mib(before),
        mib(peak),
        mib(high_water),
    );
    // Bounded: well under the object's size however large it is, and far
    // from holding it whole (let alone several copies).
    let bound = 400 << 20;
    assert!(
        high_water < bound,
        "the node's memory peaked at {:.0} MiB moving a {} MiB object",
        mib(high_water),
        size >> 20
    );
    node.stop();
}

#[test]
fn aws_s3_sync_moves_a_thousand_files_up_and_back_and_lists_by_delimiter() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data"));
    let key = create_key(&node, &["site"]);
    let home = home.path();
    aws(&node, &key, home, &["s3", "mb", "s3://site"]);
    // 1,000 files in 10 folders, two of them nested, of varied sizes; the
    // first is empty (the CLI asks for `100 Continue` for it too: see
    // below).
    let up = dir.path().join("up");
    for i in 0..1000u32 {
        let folder = match i % 10 {
            8 => up.join("d8/deeper"),
            9 => up.join("d9/deeper/deepest"),
            d => up.join(format!("d{d}")),
        };
        std::fs::create_dir_all(&folder).unwrap();
        let body: Vec<u8> = (0..(i * 37) % 5000)
            .map(|j| (i.wrapping_mul(31) ^ j) as u8)
            .collect();
        std::fs::write(folder.join(format!("f{i:04}.bin")), body).unwrap();
    }
    // Objects beside the folder, so a listing of the bucket runs past one
    // page of 1,000.
    for name in ["a.txt", "m.txt", "z.txt"] {
        let (status, _) = admin(
            &node,
            "PUT",
            &format!("/v1/buckets/site/objects/{name}"),
            &[],
            name.as_bytes(),
        );
        assert_eq!(status, 200);
    }

    // The node answers an empty upload without a `100 Continue`; unless
    // it then closes the connection, the CLI's next request on it waits
    // for an answer it already read, and fails at this read timeout.
    let started = std::time::Instant::now();
    aws(
        &node,
        &key,
        home,
        &[
            "--cli-read-timeout",
            "20",
            "s3",
            "sync",
            "--only-show-errors",
            up.to_str().unwrap(),
            "s3://site/www/",
        ],
    );
    let synced_up = started.elapsed();
    let started = std::time::Instant::now();
    let down = dir.path().join("down");
    aws(
        &node,
        &key,
        home,
        &[
            "s3",
            "sync",
            "--only-show-errors",
            "s3://site/www/",
            down.to_str().unwrap(),
        ],
    );
    let synced_down = started.elapsed();
    eprintln!("S3 sync of 1,000 files: up {synced_up:.1?}, down {synced_down:.1?}");
    let files = crate::common::files_under(&up);
    assert_eq!(files.len(), 1000);
    assert_eq!(crate::common::files_under(&down), files);
    for file in &files {
        assert!(
            std::fs::read(up.join(file)).unwrap() == std::fs::read(down.join(file)).unwrap(),
            "{file} differs after the round trip"
        );
    }
    // Nothing left to do either way.
    let again = aws(
        &node,
        &key,
        home,
        &["s3", "sync", up.to_str().unwrap(), "s3://site/www/"],
    );
    assert!(again.trim().is_empty(), "{again}");

    // Listing by delimiter: the folders, then one folder's files.
    let top = aws(&node, &key, home, &["s3", "ls", "s3://site/www/"]);
    let prefixes: Vec<&str> = top
        .lines()
        .filter_map(|line| line.trim().strip_prefix("PRE "))
        .collect();
    let want: Vec<String> = (0..10).map(|d| format!("d{d}/")).collect();
    assert_eq!(prefixes, want, "{top}");
    let listed: Value = serde_json::from_str(&aws(
        &node,
        &key,
        home,
        &[
            "s3api",
            "list-objects-v2",
            "--bucket",
            "site",
            "--prefix",
            "www/d9/",
            "--delimiter",
            "/",
        ],
    ))
    .unwrap();
    assert_eq!(
        listed["CommonPrefixes"],
        json!([{"Prefix": "www/d9/deeper/"}])
    );
    assert!(listed.get("Contents").is_none(), "{listed}");
    let listed: Value = serde_json::from_str(&aws(
        &node,
        &key,
        home,
        &[
            "s3api",
            "list-objects-v2",
            "--bucket",
            "site",
            "--prefix",
            "www/d3/",
            "--delimiter",
            "/",
        ],
    ))
    .unwrap();
    let keys: Vec<&str> = listed["Contents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 100, "{listed}");
    assert!(keys.iter().all(|k| k.starts_with("www/d3/f")), "{keys:?}");
    // The bucket's top level: three objects and one prefix, in key order.
    let listed: Value = serde_json::from_str(&aws(
        &node,
        &key,
        home,
        &[
            "s3api",
            "list-objects-v2",
            "--bucket",
            "site",
            "--delimiter",
            "/",
        ],
    ))
    .unwrap();
    assert_eq!(
        listed["CommonPrefixes"],
        json!([{"Prefix": "www/"}]),
        "{listed}"
    );
    let keys: Vec<&str> = listed["Contents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["a.txt", "m.txt", "z.txt"], "{listed}");
    // Everything, past the first page of 1,000 (the CLI follows the
    // continuation token).
    let all = aws(&node, &key, home, &["s3", "ls", "--recursive", "s3://site"]);
    assert_eq!(all.lines().count(), 1003, "{all}");
    node.stop();
}

#[test]
fn an_abandoned_multipart_upload_is_removed_after_its_age() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        &dir.path().join("data"),
        &["--s3-listen", "127.0.0.1:0", "--s3-upload-max-age", "2s"],
    );
    let key = create_key(&node, &["big"]);
    let home = home.path();
    aws(&node, &key, home, &["s3", "mb", "s3://big"]);
    let out = boto3(
        &node,
        &key,
        home,
        r#"
import time
up = s3.create_multipart_upload(Bucket='big', Key='left.bin')['UploadId']
s3.upload_part(Bucket='big', Key='left.bin', UploadId=up, PartNumber=1, Body=b'a' * 1000)
# Younger than its age: kept.
assert [p['Size'] for p in s3.list_parts(Bucket='big', Key='left.bin', UploadId=up)['Parts']] \
    == [1000]
deadline = time.time() + 30
while code(lambda: s3.list_parts(Bucket='big', Key='left.bin', UploadId=up)) == 'no error' \
        and time.time() < deadline:
    time.sleep(0.25)
assert code(lambda: s3.list_parts(Bucket='big', Key='left.bin', UploadId=up)) == 'NoSuchUpload'
print('ok')
"#,
    );
    assert_eq!(out.trim(), "ok");
    // Its parts are gone from disk too.
    let uploads = dir.path().join("data/s3-uploads");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0);
    node.stop();
}

// fake-gcs: fake-gcs-server's storage (github.com/fsouza/fake-gcs-server/fakestorage, in
// memory) behind one addition for the tests: the XML API's plain object PUT, which upstream
// serves only for signed URLs and which object_store (hoard's GCS client) uses for every
// upload, with `x-goog-if-generation-match: 0` (create only) answered 412 when the object
// exists. Everything else — downloads, ranges, HEAD, DELETE, XML listing, the JSON API — is
// upstream's. An emulator for tests: no authentication, no durability.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/fsouza/fake-gcs-server/fakestorage"
)

// Largest object accepted by a plain PUT (hoard's packs are far smaller).
const maxObject = 256 << 20

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 0, "port to listen on")
	flag.Parse()
	public := fmt.Sprintf("%s:%d", *host, *port)
	srv, err := fakestorage.NewServerWithOptions(fakestorage.Options{
		Scheme: "http", Host: *host, Port: uint16(*port), PublicHost: public, NoListener: true,
	})
	if err != nil {
		log.Fatal(err)
	}
	upstream := srv.HTTPHandler()
	var creating sync.Mutex
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if r.Method == http.MethodPut && q.Get("uploadType") == "" && q.Get("X-Goog-Algorithm") == "" &&
			r.Header.Get("x-goog-copy-source") == "" && !reserved(r.URL.Path) {
			put(srv, &creating, w, r)
			return
		}
		upstream.ServeHTTP(w, r)
	})
	log.Fatal(http.ListenAndServe(public, handler))
}

// Paths of upstream's own APIs, never an XML object PUT.
func reserved(path string) bool {
	for _, p := range []string{"/upload/", "/storage/", "/download/", "/batch/", "/_internal/"} {
		if strings.HasPrefix(path, p) {
			return true
		}
	}
	return false
}

func xmlError(w http.ResponseWriter, status int, code string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<?xml version='1.0' encoding='UTF-8'?><Error><Code>%s</Code></Error>", code)
}

// put stores `/<bucket>/<object>` from the body; create-only when the client asks for it.
func put(srv *fakestorage.Server, creating *sync.Mutex, w http.ResponseWriter, r *http.Request) {
	p := strings.TrimPrefix(r.URL.EscapedPath(), "/")
	i := strings.IndexByte(p, '/')
	if i <= 0 {
		xmlError(w, http.StatusBadRequest, "InvalidURI")
		return
	}
	bucket, err1 := url.PathUnescape(p[:i])
	name, err2 := url.PathUnescape(p[i+1:])
	if err1 != nil || err2 != nil || name == "" {
		xmlError(w, http.StatusBadRequest, "InvalidURI")
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxObject+1))
	if err != nil || len(body) > maxObject {
		xmlError(w, http.StatusBadRequest, "EntityTooLarge")
		return
	}
	creating.Lock()
	defer creating.Unlock()
	if r.Header.Get("x-goog-if-generation-match") == "0" {
		if _, err := srv.GetObject(bucket, name); err == nil {
			xmlError(w, http.StatusPreconditionFailed, "PreconditionFailed")
			return
		}
	}
	srv.CreateObject(fakestorage.Object{
		ObjectAttrs: fakestorage.ObjectAttrs{BucketName: bucket, Name: name, ContentType: r.Header.Get("Content-Type")},
		Content:     body,
	})
	stored, err := srv.GetObject(bucket, name)
	if err != nil {
		xmlError(w, http.StatusNotFound, "NoSuchBucket")
		return
	}
	w.Header().Set("ETag", strconv.Quote(stored.Etag))
	w.Header().Set("x-goog-generation", strconv.FormatInt(stored.Generation, 10))
	w.WriteHeader(http.StatusOK)
}
